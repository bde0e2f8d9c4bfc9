//! A second, independent native-protocol client through chgate: klickhouse (Rust, its own
//! implementation of the protocol, LZ4 compression on), over plain TCP and over the native
//! TLS listener. Against the real stack.
//!
//! klickhouse runs `SET date_time_input_format = ...` on connect, which a user whose
//! queries carry `readonly=1` may not: the read-only user here is sent with `readonly=2`
//! (`upstream_readonly = 2`), the level that lets clients change settings and still
//! refuses every write.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use klickhouse::{Client, ClientOptions, Row};

#[derive(Row, Debug, PartialEq, Clone)]
struct Numbered {
    n: u64,
    s: String,
}

fn options(user: &str, password: &str) -> ClientOptions {
    ClientOptions {
        username: user.into(),
        password: password.into(),
        ..ClientOptions::default()
    }
}

async fn proxy() -> (TestProxy, SocketAddr, SocketAddr, std::path::PathBuf) {
    let (cert, key) = self_signed_certificate("native-tls");
    let extra = format!(
        r#"[users.grafana]
password_hash = "{hash}"
cluster = "demo"
account = "chgate"
readonly = true
upstream_readonly = 2
"#,
        hash = hash("grafana-pass")
    );
    let text = config(&[("127.0.0.11", 8123)], &extra).replace(
        "access_log = false",
        &format!(
            "access_log = false\nnative_listen = \"127.0.0.1:0\"\n[proxy.native_tls]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            cert.display(),
            key.display()
        ),
    );
    let p = TestProxy::start(&text).await;
    let native = p.native.expect("native listener");
    let tls = p.native_tls.expect("native TLS listener");
    (p, native, tls, cert)
}

async fn check_reads(client: &Client) {
    let rows: Vec<Numbered> = client
        .query_collect(
            "SELECT number AS n, toString(number * 3) AS s FROM system.numbers LIMIT 200000",
        )
        .await
        .expect("select");
    assert_eq!(rows.len(), 200_000);
    assert!(rows
        .iter()
        .enumerate()
        .all(|(i, r)| r.n == i as u64 && r.s == (i * 3).to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn klickhouse_reads_writes_and_is_refused_through_chgate() {
    let (p, native, _tls, _) = proxy().await;
    let reader = Client::connect(native, options("grafana", "grafana-pass"))
        .await
        .expect("connect as a read-only user");
    check_reads(&reader).await;
    // A read-only user's INSERT is refused; the connection goes on.
    let table = format!("default.{}", unique("klick").replace('-', "_"));
    assert!(direct(
        "127.0.0.11",
        &format!("CREATE TABLE {table} (n UInt64, s String) ENGINE = Memory")
    )
    .is_empty());
    let rows = vec![Numbered {
        n: 1,
        s: "a".into(),
    }];
    let refused = reader
        .insert_native_block(&format!("INSERT INTO {table} FORMAT Native"), rows.clone())
        .await;
    let e = format!("{:?}", refused.expect_err("a read-only insert fails"));
    assert!(e.contains("164") || e.contains("readonly"), "{e}");
    check_reads(&reader).await;

    // The writing user writes. (klickhouse's own block inserts fail against 18.16 straight
    // to a node too: "missing type for data"; a server-side INSERT stands in.)
    let writer = Client::connect(native, options("etl", "etl-pass"))
        .await
        .expect("connect etl");
    writer
        .execute(format!(
            "INSERT INTO {table} SELECT number, toString(number) FROM system.numbers LIMIT 30000"
        ))
        .await
        .expect("insert");
    let got = direct(
        "127.0.0.11",
        &format!("SELECT count(), sum(n) FROM {table}"),
    );
    direct("127.0.0.11", &format!("DROP TABLE {table}"));
    assert_eq!(
        got.trim(),
        format!("30000\t{}", (0..30_000u64).sum::<u64>())
    );

    // A wrong password: klickhouse reports only that the connection ended ("channel
    // closed"); chgate counted the refusal.
    let bad = Client::connect(native, options("grafana", "wrong")).await;
    if let Ok(c) = bad {
        assert!(c
            .query_collect::<Numbered>("SELECT 1 AS n, '' AS s")
            .await
            .is_err());
    }
    let m = p.metrics().await;
    assert!(
        metric_sum(
            &m,
            "chgate_native_connections_total",
            &["result=\"auth_failed\""]
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn klickhouse_over_the_native_tls_listener() {
    let (p, _native, tls, cert) = proxy().await;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // klickhouse's own `tls` feature would pull in a second crypto provider: the stream is
    // made here and handed to it.
    let tcp = tokio::net::TcpStream::connect(tls).await.unwrap();
    let stream = connector.connect(name, tcp).await.expect("TLS handshake");
    let (read, write) = tokio::io::split(stream);
    let client = Client::connect_stream(read, write, options("grafana", "grafana-pass"))
        .await
        .expect("connect over TLS");
    check_reads(&client).await;
    let m = p.metrics().await;
    assert!(
        metric_sum(
            &m,
            "chgate_native_queries_total",
            &["user=\"grafana\"", "status=\"ok\""]
        ) >= 2.0,
        "{m}"
    );
}
