"""Python clickhouse-driver through chgate's native listener, checked against the same
queries sent straight to a node. Run by tests/native_proxy.rs with the stack's Python.

usage: native_driver.py PROXY_PORT NODE_HOST ACCOUNT_PASSWORD_FILE TABLE
"""

import sys
import threading
import time

from clickhouse_driver import Client
from clickhouse_driver.errors import ServerException, Error

port = int(sys.argv[1])
node = sys.argv[2]
account_password = open(sys.argv[3]).read().strip()
table = sys.argv[4]

checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)
    checks += 1
    print(f"ok: {what}", flush=True)


def proxy(user="bi", password="bi-pass", **kw):
    return Client("127.0.0.1", port=port, user=user, password=password, **kw)


direct = Client(node, port=9000, user="chgate", password=account_password)

# Plain selects, with and without compression, against the node's own answer.
big = "SELECT number, toString(number * 7) AS s, [number, 1] AS a FROM system.numbers LIMIT 300000"
want = direct.execute(big)
for compression in (False, True):
    c = proxy(compression=compression)
    check(c.execute("SELECT 1") == [(1,)], f"SELECT 1 (compression={compression})")
    got = c.execute(big)
    check(got == want, f"300k rows equal to the node's (compression={compression})")
    # Server-side progress, totals, extremes (no table function: 18.16 forbids them to
    # readonly=1, which `bi`'s queries carry). The driver appends the totals row and the
    # two extremes rows to the result.
    grouped = (
        "SELECT number % 3 AS k, count() FROM (SELECT number FROM system.numbers LIMIT 1000)"
        " GROUP BY k WITH TOTALS ORDER BY k"
    )
    rows = c.execute(grouped, settings={"extremes": 1})
    check(
        rows == direct.execute(grouped, settings={"extremes": 1})
        and rows[3:] == [(0, 1000), (0, 333), (2, 334)],
        f"WITH TOTALS and extremes as the node answers them (compression={compression})",
    )
    c.disconnect()

# Settings sent with a query reach the server (typed binary at revision 54412).
c = proxy()
got = c.execute(
    "SELECT value FROM system.settings WHERE name = 'max_threads'",
    settings={"max_threads": 3, "max_execution_time": 30},
)
check(got == [("3",)], "a read-only user's settings, max_execution_time included, reach the server")

# Server exceptions pass through, and the connection goes on.
try:
    c.execute("SELECT throwIf(1)")
    check(False, "throwIf raises")
except ServerException as e:
    check(e.code == 395, f"the server's exception code comes through ({e.code})")
check(c.execute("SELECT 2") == [(2,)], "the connection works after an exception")

# A read-only user's write is refused before any data flows; the connection goes on.
try:
    c.execute(f"INSERT INTO {table} (id, s) VALUES", [(1, "x")])
    check(False, "a read-only INSERT raises")
except ServerException as e:
    check(e.code == 164, f"a read-only user's INSERT is refused with READONLY ({e.code})")
check(c.execute("SELECT 3") == [(3,)], "the connection works after a refusal")
try:
    c.execute("CREATE TABLE default.never (x UInt8) ENGINE = Memory")
    check(False, "a read-only CREATE raises")
except ServerException as e:
    check(e.code == 164, f"a read-only user's CREATE is refused ({e.code})")

# External tables.
got = c.execute(
    "SELECT count(), sum(x) FROM ext",
    external_tables=[{"name": "ext", "structure": [("x", "UInt32")], "data": [{"x": 1}, {"x": 2}, {"x": 40}]}],
)
check(got == [(3, 43)], "an external table is sent and read")

# Cancel a running query; the connection goes on.
rows_seen = []
progress = c.execute_with_progress("SELECT count() FROM system.numbers WHERE NOT ignore(sipHash64(number))")
started = time.monotonic()
for p in progress:
    rows_seen.append(p)
    if time.monotonic() - started > 0.7:
        c.cancel()
        break
check(c.execute("SELECT 4") == [(4,)], "the connection works after a cancel")

# A server-side timeout.
try:
    c.execute("SELECT count() FROM system.numbers", settings={"max_execution_time": 1})
    check(False, "the timeout raises")
except ServerException as e:
    check(e.code == 159, f"max_execution_time ends the query with TIMEOUT_EXCEEDED ({e.code})")
check(c.execute("SELECT 5") == [(5,)], "the connection works after a timeout")
c.disconnect()

# Columnar and row inserts as the writing user, counted on the node.
w = proxy("etl", "etl-pass", compression=True)
n = 50000
w.execute(f"INSERT INTO {table} (id, s) VALUES", [list(range(n)), [f"row-{i}" for i in range(n)]], columnar=True)
w.execute(f"INSERT INTO {table} (id, s) VALUES", [(n + i, "r") for i in range(10)])
got = direct.execute(f"SELECT count(), sum(id) FROM {table}")
check(got == [(n + 10, sum(range(n + 10)))], "a compressed columnar insert and a row insert landed whole")
w.disconnect()

# A wrong password.
try:
    proxy("bi", "wrong").execute("SELECT 1")
    check(False, "a wrong password raises")
except ServerException as e:
    check(e.code == 516 and "Authentication failed" in e.message, f"a wrong password gets code 516 ({e.code})")

# Many queries on one connection from several threads' clients at once.
errors = []


def loop():
    try:
        cl = proxy()
        for i in range(50):
            assert cl.execute("SELECT %(i)s", {"i": i}) == [(i,)]
        cl.disconnect()
    except Exception as e:  # noqa: BLE001 - reported below
        errors.append(repr(e))


threads = [threading.Thread(target=loop) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
check(not errors, f"4 clients x 50 queries each ({errors[:1]})")

print(f"all {checks} native driver checks passed", flush=True)
