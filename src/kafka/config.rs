//! librdkafka client settings from chgate's config.

use std::collections::BTreeMap;

/// A client config for `brokers` with the operator's `properties` (any librdkafka
/// consumer or producer property) on top.
pub fn client_config(
    brokers: &str,
    properties: &BTreeMap<String, String>,
) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}
