//! PostgreSQL's replication protocol: the connection ([`wire`]) and the `pgoutput`
//! plugin's messages ([`pgoutput`]); TLS for it and for tokio-postgres ([`tls`]).

pub mod pgoutput;
pub mod tls;
pub mod wire;
