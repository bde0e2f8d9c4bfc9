//! PostgreSQL's replication protocol: the connection ([`wire`]) and the `pgoutput`
//! plugin's messages ([`pgoutput`]).

pub mod pgoutput;
pub mod wire;
