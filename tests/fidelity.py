"""ClickHouse's HTTP interface, straight from a node and through chgate, compared where clients
look: status, body, header names in their case and order, keep-alive, sessions, client
details. Run by tests/http_fidelity.rs with Python's http.client and requests as the clients:

    fidelity.py CHGATE_PORT NODE_HOST NODE_PASSWORD_FILE KEEP_ALIVE_SECONDS

chgate runs a one-node cluster on NODE_HOST, so both answers come from the same server.
Exits non-zero with a message on the first difference that is not a documented one."""

import base64
import http.client
import select
import sys
import threading
import time

import requests

CHGATE = ("127.0.0.1", int(sys.argv[1]))
NODE = (sys.argv[2], 8123)
NODE_PASSWORD = open(sys.argv[3]).read().strip()
KEEP_ALIVE = int(sys.argv[4])


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


DIRECT = (NODE, basic("chgate", NODE_PASSWORD))
PROXIED = (CHGATE, basic("bi", "bi-pass"))


def fail(message):
    print("FAIL:", message)
    sys.exit(1)


def exchange(target, method, path, body=None, headers=()):
    (host, port), auth = target
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest(method, path, skip_accept_encoding=True)
    conn.putheader("Authorization", auth)
    for name, value in headers:
        conn.putheader(name, value)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    if body is not None:
        conn.send(body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheaders(), data


# Headers whose value is the node's or the moment's; chgate's Keep-Alive is its own.
VARYING = {"Date"}


def compare_query(method, path, body=None):
    status_d, headers_d, body_d = exchange(DIRECT, method, path, body)
    status_c, headers_c, body_c = exchange(PROXIED, method, path, body)
    where = f"{method} {path}"
    if status_c != status_d:
        fail(f"{where}: status {status_c} through chgate, {status_d} direct")
    if body_c != body_d:
        fail(f"{where}: body {body_c[:200]!r} through chgate, {body_d[:200]!r} direct")
    # chgate adds the query id where 18.16 does not send it (later versions do, themselves).
    added = [(n, v) for n, v in headers_c if n.lower() == "x-clickhouse-query-id"]
    if len(added) != 1:
        fail(f"{where}: one X-ClickHouse-Query-Id expected through chgate: {headers_c}")
    proxied = [(n, v) for n, v in headers_c if n.lower() != "x-clickhouse-query-id"]
    direct = list(headers_d)
    if method == "HEAD":
        # hyper never sends Transfer-Encoding on a HEAD answer (RFC 9110 lets it leave it out).
        direct = [(n, v) for n, v in direct if n != "Transfer-Encoding"]
    names_d = [n for n, _ in direct]
    names_c = [n for n, _ in proxied]
    if names_c != names_d:
        fail(f"{where}: header names (case and order) differ:\n  chgate {names_c}\n  direct {names_d}")
    for (name, value_c), (_, value_d) in zip(proxied, direct):
        if name in VARYING:
            continue
        if name == "Keep-Alive":
            if value_c != f"timeout={KEEP_ALIVE}":
                fail(f"{where}: Keep-Alive {value_c!r}: chgate advertises its own timeout")
            continue
        if value_c != value_d:
            fail(f"{where}: {name}: {value_c!r} through chgate, {value_d!r} direct")
    print(f"ok {where}: {status_c}, {names_c}")


def check_paths():
    # Queries on any path with a query string, and any POST, as 18.16 takes them.
    compare_query("GET", "/?query=SELECT+1")
    compare_query("POST", "/", b"SELECT 1")
    compare_query("HEAD", "/?query=SELECT+1")
    compare_query("GET", "/?query=SELECT+nosuchcolumn")
    compare_query("GET", "/anything?query=SELECT+2")
    compare_query("POST", "/anything/else", b"SELECT 3")
    compare_query("GET", "/?query=SELECT+number+FROM+system.numbers+LIMIT+5+FORMAT+JSONEachRow")
    # Answered by chgate itself, with ClickHouse's status and body.
    for path in ["/", "/ping", "/replicas_status"]:
        s_c, h_c, b_c = exchange(PROXIED, "GET", path)
        s_d, h_d, b_d = exchange(DIRECT, "GET", path)
        if (s_c, b_c) != (s_d, b_d):
            fail(f"GET {path}: {s_c} {b_c!r} through chgate, {s_d} {b_d!r} direct")
        # 18.16 sends no Content-Type on /ping and /replicas_status; 23.x+ does on /ping.
        names_c = [n for n, _ in h_c if path == "/" or n != "Content-Type"]
        names_d = [n for n, _ in h_d]
        if names_c != names_d:
            fail(f"GET {path}: header names {names_c} through chgate, {names_d} direct")
        print(f"ok GET {path}: {s_c} {b_c!r} {names_c}")
    # The web UIs of 23.x+ come from a node (18.16 has none: its own 404 comes back).
    s_c, _, b_c = exchange(PROXIED, "GET", "/play")
    s_d, _, b_d = exchange(DIRECT, "GET", "/play")
    if (s_c, b_c) != (s_d, b_d):
        fail(f"GET /play: {s_c} {b_c[:100]!r} through chgate, {s_d} {b_d[:100]!r} direct")
    s, _, b = exchange(PROXIED, "GET", "/nothing/here")
    if s != 404 or not b.startswith(b"There is no handle /nothing/here\n"):
        fail(f"GET /nothing/here: {s} {b!r}")
    s, _, b = exchange(PROXIED, "GET", "/replicas_status?verbose=1")
    if s != 200 or b"demo.shard1.replica1:\tOk." not in b or b"127.0.0" in b:
        fail(f"verbose /replicas_status: {s} {b!r}")
    s, _, _ = exchange(PROXIED, "PUT", "/", b"")
    if s != 501:
        fail(f"PUT /: {s}, ClickHouse answers 501")
    s, h, _ = exchange(PROXIED, "OPTIONS", "/")
    if s != 204 or ("Access-Control-Allow-Origin", "*") not in [(n.title(), v) for n, v in h]:
        fail(f"OPTIONS /: {s} {h}")
    print("ok paths: 404, verbose replicas_status, 501, OPTIONS")


def closed(sock):
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        import socket

        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def check_keep_alive():
    (host, port), auth = PROXIED
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/?query=SELECT+1", headers={"Authorization": auth})
    resp = conn.getresponse()
    resp.read()
    if resp.getheader("Connection") != "Keep-Alive":
        fail(f"Connection: {resp.getheader('Connection')}")
    sock = conn.sock
    time.sleep(KEEP_ALIVE / 2)
    if closed(sock):
        fail(f"closed before half of its advertised {KEEP_ALIVE} s")
    conn.request("GET", "/?query=SELECT+2", headers={"Authorization": auth})
    resp = conn.getresponse()
    if resp.read() != b"2\n" or conn.sock is not sock:
        fail("the second request did not reuse the connection")
    time.sleep(KEEP_ALIVE + 0.7)
    if not closed(sock):
        fail(f"an idle connection is still open after the advertised {KEEP_ALIVE} s")
    conn.close()
    # A client asking to close gets Connection: Close, and the connection ends.
    status, headers, _ = exchange(PROXIED, "GET", "/?query=SELECT+1", headers=[("Connection", "close")])
    if dict(headers).get("Connection") != "Close" or "Keep-Alive" in dict(headers):
        fail(f"Connection: close request: {headers}")
    # HTTP/1.0: an answer of unknown length ends with the connection, and says so.
    import socket

    raw = socket.create_connection(CHGATE)
    raw.sendall(
        f"GET /?query=SELECT+1 HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: {auth}\r\n\r\n".encode()
    )
    answer = b""
    raw.settimeout(5)
    while chunk := raw.recv(65536):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200") or b"\r\nConnection: Close" not in head or body != b"1\n":
        fail(f"HTTP/1.0 keep-alive request: {answer!r}")
    print(f"ok keep-alive: reused within, closed after {KEEP_ALIVE} s; HTTP/1.0 closes unknown lengths")


def check_requests():
    session = requests.Session()
    url = f"http://{CHGATE[0]}:{CHGATE[1]}/"
    for i in range(3):
        r = session.post(url, data=f"SELECT {i}", auth=("bi", "bi-pass"))
        if r.status_code != 200 or r.text != f"{i}\n":
            fail(f"requests: {r.status_code} {r.text!r}")
    names = list(r.raw.headers.keys())
    for name in ["Content-Type", "X-ClickHouse-Server-Display-Name", "Keep-Alive", "Transfer-Encoding"]:
        if name not in names:
            fail(f"requests sees {names}, not {name} in its case")
    r = session.get(url, params={"query": "SELECT throwIf(1)"}, auth=("bi", "bi-pass"))
    if r.status_code != 500 or "Code: 395" not in r.text:
        fail(f"requests, an error: {r.status_code} {r.text!r}")
    r = session.get(url, params={"query": "SELECT 1"}, auth=("bi", "wrong"))
    if r.status_code != 401 or "Code: 516" not in r.text:
        fail(f"requests, a wrong password: {r.status_code} {r.text!r}")
    print(f"ok requests: {names}")


def check_session_lock():
    """A second request on a session another request holds is refused at once, as directly;
    one whose body comes late is refused as soon as its body is in, as directly."""
    results = {}
    for name, target in [("direct", DIRECT), ("chgate", PROXIED)]:
        sid = f"lock-{name}-{time.time_ns()}"
        holder = threading.Thread(
            target=exchange, args=(target, "GET", f"/?session_id={sid}&query=SELECT+sleep(2)")
        )
        holder.start()
        time.sleep(0.5)
        started = time.time()
        status, _, body = exchange(target, "GET", f"/?session_id={sid}&query=SELECT+1")
        quick = time.time() - started
        (host, port), auth = target
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.putrequest("POST", f"/?session_id={sid}")
        conn.putheader("Authorization", auth)
        conn.putheader("Content-Length", "8")
        conn.endheaders()
        time.sleep(0.5)
        sent = time.time()
        conn.send(b"SELECT 1")
        resp = conn.getresponse()
        late_body = resp.read()
        after_body = time.time() - sent
        holder.join()
        if status != 500 or b"Code: 373" not in body or b"Code: 373" not in late_body:
            fail(f"{name}: session lock: {status} {body!r} / {late_body!r}")
        results[name] = (quick, after_body)
        print(f"ok {name} session lock: refused in {quick * 1000:.0f} ms; late body refused {after_body * 1000:.0f} ms after it")
    for i, what in enumerate(["refusal", "refusal after a late body"]):
        if results["chgate"][i] > results["direct"][i] + 0.2:
            fail(f"the {what} comes {results['chgate'][i]:.3f} s through chgate, {results['direct'][i]:.3f} s direct")


def check_client_details():
    """What the server can learn of the client: 18.16 shows chgate's address in
    system.processes, and the client's User-Agent in http_user_agent."""
    qid = f"fidelity-{time.time_ns()}"
    status, _, body = exchange(
        PROXIED,
        "GET",
        f"/?query_id={qid}&query=SELECT+http_user_agent,+address+FROM+system.processes+WHERE+query_id+%3D+%27{qid}%27",
        headers=[("User-Agent", "fidelity-test/1.0"), ("X-Forwarded-For", "203.0.113.7")],
    )
    if status != 200 or not body.startswith(b"fidelity-test/1.0\t"):
        fail(f"client details: {status} {body!r}")
    print(f"ok client details in system.processes: {body!r}")


check_paths()
check_keep_alive()
check_requests()
check_session_lock()
check_client_details()
print("all fidelity checks passed")
