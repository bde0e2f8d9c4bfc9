//! ClickHouse's HTTP interface byte for byte where clients look: the same requests straight
//! to a node and through chgate (a one-node cluster on that node), compared by curl and by
//! Python's http.client and requests (`tests/fidelity.py`): header names in the server's
//! case and order, Connection and Keep-Alive (chgate's own timeout, honoured), the paths
//! ClickHouse takes queries on and the handlers it answers itself, session locks, and what
//! the server learns of the client. Against the real stack.

mod common;

use std::process::Command;

use common::*;

async fn one_node_proxy() -> TestProxy {
    let text = config(&[("127.0.0.11", 8123)], "").replace(
        "access_log = false",
        "access_log = false\nkeep_alive_timeout = \"2s\"",
    );
    TestProxy::start(&text).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_see_what_clickhouse_sends() {
    let p = one_node_proxy().await;
    let port = p.http.port().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fidelity.py");
    let secret = secret_file("chgate");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args([script, &port, "127.0.0.11", secret.to_str().unwrap(), "2"])
            .output()
            .expect("run the stack's python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fidelity.py failed:\n{stdout}");
    assert!(stdout.contains("all fidelity checks passed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sees_the_servers_header_lines() {
    let p = one_node_proxy().await;
    let proxied = curl_async(
        [
            "-sS",
            "-i",
            "-u",
            "bi:bi-pass",
            &format!("{}/?query=SELECT+1", p.url()),
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    let direct = curl_async(vec![
        "-sS".into(),
        "-i".into(),
        "-u".into(),
        format!("chgate:{}", secret("chgate")),
        "http://127.0.0.11:8123/?query=SELECT+1".into(),
    ])
    .await;
    let names = |text: &str| -> Vec<String> {
        text.lines()
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.to_string()))
            .filter(|n| n != "x-clickhouse-query-id")
            .collect()
    };
    assert_eq!(
        names(&proxied.body),
        names(&direct.body),
        "{}",
        proxied.body
    );
    assert!(
        proxied.body.contains("\r\nKeep-Alive: timeout=2\r\n"),
        "{}",
        proxied.body
    );
    assert!(proxied
        .body
        .contains("\r\nContent-Type: text/tab-separated-values; charset=UTF-8\r\n"));
    assert!(proxied.body.ends_with("\r\n\r\n1\n"), "{:?}", proxied.body);
}
