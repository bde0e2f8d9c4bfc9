//! Client packets of the native protocol, read and written at a negotiated revision: the
//! Hello (read to log the client in, written with the cluster account), the Query (read
//! whole to check and rewrite it, written back with its fields in the server's order), and
//! where the others end.
//!
//! Handled up to [`MAX_REVISION`](super::server::MAX_REVISION), where a Query's settings are
//! typed binary values: a setting's value can be stepped over only by knowing its type, so
//! a setting the table of [`super::settings`] does not know is refused by name
//! ([`WalkError::UnknownSetting`]); the bytes after it could not be read.

use super::reader::{Reader, Result, WalkError};
use super::settings::{binary_form, Binary};
use crate::clickhouse::rowbinary::write_varint;

/// Revisions at which the client's packets change.
pub const WITH_CLIENT_INFO: u64 = 54032;
pub const WITH_QUOTA_KEY: u64 = 54060;
pub const WITH_VERSION_PATCH: u64 = 54401;
/// From this revision on settings travel as strings; below it, as typed binary values.
pub const WITH_SETTINGS_AS_STRINGS: u64 = 54429;

/// Client packet types.
pub const HELLO: u64 = 0;
pub const QUERY: u64 = 1;
pub const DATA: u64 = 2;
pub const CANCEL: u64 = 3;
pub const PING: u64 = 4;

/// The client's Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub client_name: String,
    pub major: u64,
    pub minor: u64,
    pub revision: u64,
    pub database: String,
    pub user: String,
    pub password: String,
}

impl std::fmt::Display for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}.{} (revision {})",
            self.client_name, self.major, self.minor, self.revision
        )
    }
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| WalkError::Malformed(what))
}

impl Hello {
    /// The Hello at the start of `buf` and its length. Anything but a Hello first is
    /// malformed: nothing else may come before authentication.
    pub fn read(buf: &[u8]) -> Result<(Hello, usize)> {
        let mut r = Reader::new(buf);
        if r.varuint()? != HELLO {
            return Err(WalkError::Malformed("the first packet is not a Hello"));
        }
        let client_name = utf8(r.string()?, "a client name that is not UTF-8")?;
        let major = r.varuint()?;
        let minor = r.varuint()?;
        let revision = r.varuint()?;
        let database = utf8(r.string()?, "a database name that is not UTF-8")?;
        let user = utf8(r.string()?, "a user name that is not UTF-8")?;
        let password = utf8(r.string()?, "a password that is not UTF-8")?;
        let hello = Hello {
            client_name,
            major,
            minor,
            revision,
            database,
            user,
            password,
        };
        Ok((hello, r.position()))
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        write_varint(out, HELLO);
        put_str(out, self.client_name.as_bytes());
        write_varint(out, self.major);
        write_varint(out, self.minor);
        write_varint(out, self.revision);
        put_str(out, self.database.as_bytes());
        put_str(out, self.user.as_bytes());
        put_str(out, self.password.as_bytes());
    }
}

/// A length-prefixed string.
pub fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    write_varint(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// Where the query comes from, as the client describes itself in each Query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo<'a> {
    /// 1 for a query a client sent, 2 for one a server sent on its behalf.
    pub kind: u8,
    pub initial_user: &'a [u8],
    pub initial_query_id: &'a [u8],
    pub initial_address: &'a [u8],
    pub interface: Interface<'a>,
    pub quota_key: &'a [u8],
    pub version_patch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interface<'a> {
    Tcp {
        os_user: &'a [u8],
        hostname: &'a [u8],
        client_name: &'a [u8],
        major: u64,
        minor: u64,
        revision: u64,
    },
    Http {
        method: u8,
        user_agent: &'a [u8],
    },
}

impl<'a> ClientInfo<'a> {
    /// A query a client sent itself over TCP, with nothing about its machine: what chgate
    /// sends for its own queries (and tests for theirs).
    pub fn initial_tcp(
        client_name: &'a [u8],
        (major, minor): (u64, u64),
        revision: u64,
        quota_key: &'a [u8],
    ) -> Self {
        ClientInfo {
            kind: 1,
            initial_user: b"",
            initial_query_id: b"",
            initial_address: b"0.0.0.0:0",
            interface: Interface::Tcp {
                os_user: b"",
                hostname: b"",
                client_name,
                major,
                minor,
                revision,
            },
            quota_key,
            version_patch: 0,
        }
    }

    fn read(r: &mut Reader<'a>, revision: u64) -> Result<Self> {
        let kind = r.u8()?;
        let initial_user = r.string()?;
        let initial_query_id = r.string()?;
        let initial_address = r.string()?;
        let interface = match r.u8()? {
            1 => Interface::Tcp {
                os_user: r.string()?,
                hostname: r.string()?,
                client_name: r.string()?,
                major: r.varuint()?,
                minor: r.varuint()?,
                revision: r.varuint()?,
            },
            2 => Interface::Http {
                method: r.u8()?,
                user_agent: r.string()?,
            },
            _ => {
                return Err(WalkError::Malformed(
                    "a client interface other than TCP or HTTP",
                ))
            }
        };
        let quota_key = if revision >= WITH_QUOTA_KEY {
            r.string()?
        } else {
            &[]
        };
        let version_patch = if revision >= WITH_VERSION_PATCH {
            r.varuint()?
        } else {
            0
        };
        Ok(Self {
            kind,
            initial_user,
            initial_query_id,
            initial_address,
            interface,
            quota_key,
            version_patch,
        })
    }

    fn write(&self, out: &mut Vec<u8>, revision: u64) {
        out.push(self.kind);
        put_str(out, self.initial_user);
        put_str(out, self.initial_query_id);
        put_str(out, self.initial_address);
        match &self.interface {
            Interface::Tcp {
                os_user,
                hostname,
                client_name,
                major,
                minor,
                revision,
            } => {
                out.push(1);
                put_str(out, os_user);
                put_str(out, hostname);
                put_str(out, client_name);
                write_varint(out, *major);
                write_varint(out, *minor);
                write_varint(out, *revision);
            }
            Interface::Http { method, user_agent } => {
                out.push(2);
                out.push(*method);
                put_str(out, user_agent);
            }
        }
        if revision >= WITH_QUOTA_KEY {
            put_str(out, self.quota_key);
        }
        if revision >= WITH_VERSION_PATCH {
            write_varint(out, self.version_patch);
        }
    }
}

/// One setting of a Query: its name and its value's bytes as they were sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting<'a> {
    pub name: &'a str,
    pub value: &'a [u8],
}

/// A Query packet, read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query<'a> {
    pub query_id: &'a [u8],
    pub info: Option<ClientInfo<'a>>,
    pub settings: Vec<Setting<'a>>,
    pub stage: u64,
    /// The client's blocks of this query (and the server's) come in compressed frames.
    pub compression: bool,
    pub text: &'a [u8],
}

impl<'a> Query<'a> {
    /// The Query at the start of `buf` (its type included) and its length.
    pub fn read(buf: &'a [u8], revision: u64) -> Result<(Self, usize)> {
        if revision >= WITH_SETTINGS_AS_STRINGS {
            return Err(WalkError::Unsupported("a revision above what chgate reads"));
        }
        let mut r = Reader::new(buf);
        if r.varuint()? != QUERY {
            return Err(WalkError::Malformed("not a Query packet"));
        }
        let query_id = r.string()?;
        let info = if revision >= WITH_CLIENT_INFO {
            Some(ClientInfo::read(&mut r, revision)?)
        } else {
            None
        };
        let mut settings = Vec::new();
        loop {
            let name = std::str::from_utf8(r.string()?)
                .map_err(|_| WalkError::Malformed("a setting name that is not UTF-8"))?;
            if name.is_empty() {
                break;
            }
            let start = r.position();
            match binary_form(name) {
                // Both are LEB128 on the wire; only their meaning differs.
                Some(Binary::VarUInt | Binary::VarInt) => {
                    r.varuint()?;
                }
                Some(Binary::String) => {
                    r.string()?;
                }
                None => return Err(WalkError::UnknownSetting(name.to_string())),
            }
            let value = &buf[start..r.position()];
            settings.push(Setting { name, value });
        }
        let stage = r.varuint()?;
        let compression = match r.varuint()? {
            0 => false,
            1 => true,
            _ => return Err(WalkError::Malformed("a compression flag other than 0 or 1")),
        };
        let text = r.string()?;
        let query = Query {
            query_id,
            info,
            settings,
            stage,
            compression,
            text,
        };
        Ok((query, r.position()))
    }

    /// The packet, type included, at `revision`.
    pub fn write(&self, out: &mut Vec<u8>, revision: u64) {
        write_varint(out, QUERY);
        put_str(out, self.query_id);
        if revision >= WITH_CLIENT_INFO {
            if let Some(info) = &self.info {
                info.write(out, revision);
            }
        }
        for s in &self.settings {
            put_str(out, s.name.as_bytes());
            out.extend_from_slice(s.value);
        }
        put_str(out, b"");
        write_varint(out, self.stage);
        write_varint(out, u64::from(self.compression));
        put_str(out, self.text);
    }
}

/// A typed setting value of the VarUInt kind, as [`Setting::value`] holds it.
pub fn varuint_value(value: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(2);
    write_varint(&mut out, value);
    out
}

/// An empty uncompressed Data block (the end of a query's data), at a revision with
/// `BlockInfo`.
pub fn write_empty_data(out: &mut Vec<u8>) {
    write_varint(out, DATA);
    put_str(out, b"");
    // BlockInfo: is_overflows = 0, bucket_num = -1, end.
    out.extend_from_slice(&[1, 0, 2, 0xff, 0xff, 0xff, 0xff, 0]);
    // No columns, no rows.
    out.extend_from_slice(&[0, 0]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            client_name: "ClickHouse client".into(),
            major: 18,
            minor: 16,
            revision: 54412,
            database: "demo".into(),
            user: "bi".into(),
            password: "secret".into(),
        }
    }

    #[test]
    fn hello_round_trips_and_is_incomplete_when_cut() {
        let mut out = Vec::new();
        hello().write(&mut out);
        assert_eq!(Hello::read(&out).unwrap(), (hello(), out.len()));
        for end in 0..out.len() {
            assert_eq!(Hello::read(&out[..end]), Err(WalkError::Incomplete));
        }
        assert!(matches!(Hello::read(&[1]), Err(WalkError::Malformed(_))));
    }

    fn query(settings: Vec<Setting<'static>>) -> Query<'static> {
        Query {
            query_id: b"q-1",
            info: Some(ClientInfo {
                kind: 1,
                initial_user: b"",
                initial_query_id: b"",
                initial_address: b"0.0.0.0:0",
                interface: Interface::Tcp {
                    os_user: b"me",
                    hostname: b"host",
                    client_name: b"ClickHouse client",
                    major: 18,
                    minor: 16,
                    revision: 54412,
                },
                quota_key: b"",
                version_patch: 1,
            }),
            settings,
            stage: 2,
            compression: true,
            text: b"SELECT 1",
        }
    }

    #[test]
    fn query_round_trips_with_typed_settings() {
        let threads = varuint_value(4);
        let threads: &'static [u8] = Box::leak(threads.into_boxed_slice());
        let q = query(vec![
            Setting {
                name: "max_threads",
                value: threads,
            },
            Setting {
                name: "load_balancing",
                value: b"\x08in_order",
            },
        ]);
        let mut out = Vec::new();
        q.write(&mut out, 54412);
        let (back, len) = Query::read(&out, 54412).unwrap();
        assert_eq!(len, out.len());
        assert_eq!(back, q);
        for end in 0..out.len() {
            assert_eq!(Query::read(&out[..end], 54412), Err(WalkError::Incomplete));
        }
    }

    #[test]
    fn a_setting_value_longer_than_the_node_reads_is_refused() {
        // max_threads = a 10-byte VarUInt: 18.16 stops after nine and would take the tenth
        // and what follows (the settings chgate appends, the query text) as new fields.
        let q = query(vec![Setting {
            name: "max_threads",
            value: b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00",
        }]);
        let mut out = Vec::new();
        q.write(&mut out, 54412);
        assert!(matches!(
            Query::read(&out, 54412),
            Err(WalkError::Malformed(_))
        ));
    }

    #[test]
    fn an_unknown_setting_is_refused_by_name() {
        let q = query(vec![Setting {
            name: "no_such_setting",
            value: b"\x01",
        }]);
        let mut out = Vec::new();
        q.write(&mut out, 54412);
        assert_eq!(
            Query::read(&out, 54412),
            Err(WalkError::UnknownSetting("no_such_setting".into()))
        );
    }

    #[test]
    fn the_empty_block_walks() {
        let mut out = Vec::new();
        write_empty_data(&mut out);
        let mut r = Reader::new(&out);
        assert_eq!(r.varuint().unwrap(), DATA);
        r.string().unwrap();
        let block = super::super::walk_block(
            r.bytes_after().unwrap(),
            super::super::Framing {
                block_info: true,
                custom_serialization: false,
                empty_low_cardinality_granule: false,
            },
        )
        .unwrap();
        assert_eq!((block.columns, block.rows), (0, 0));
    }
}
