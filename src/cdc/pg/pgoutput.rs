//! The replication stream's frames (XLogData, keepalive) and the `pgoutput` plugin's
//! logical messages inside them, protocol versions 1 and 2 (v2 adds the stream blocks of
//! large in-progress transactions, whose messages carry their transaction's xid).
//!
//! Reference: PostgreSQL's "Logical Replication Message Formats" and
//! `src/backend/replication/logical/proto.c`. Every read is bounds-checked: a frame the
//! server (or anything pretending to be it) cuts short is an error, never a panic.

use bytes::Bytes;

/// A frame of the COPY BOTH stream.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// WAL data: the LSN it starts at and the logical message it carries.
    XLogData { start: u64, end: u64, data: Bytes },
    /// The server's position, and whether it wants a status update now.
    Keepalive { end: u64, reply: bool },
}

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// A TOASTed value the update did not change: the server does not send it.
    Unchanged,
    Text(Bytes),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

/// A logical message. `xid` is set inside a stream block (protocol v2).
#[derive(Debug, PartialEq)]
pub enum Logical {
    Begin {
        final_lsn: u64,
        commit_ts: i64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
    },
    Origin,
    Relation {
        xid: Option<u32>,
        relation: Relation,
    },
    Type {
        xid: Option<u32>,
        oid: u32,
        name: String,
    },
    Insert {
        xid: Option<u32>,
        relation: u32,
        new: Vec<Datum>,
    },
    /// `old` is the key (`K`) or the whole old row (`O`, REPLICA IDENTITY FULL) when sent.
    Update {
        xid: Option<u32>,
        relation: u32,
        old: Option<(u8, Vec<Datum>)>,
        new: Vec<Datum>,
    },
    Delete {
        xid: Option<u32>,
        relation: u32,
        old: (u8, Vec<Datum>),
    },
    Truncate {
        xid: Option<u32>,
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    Message {
        xid: Option<u32>,
        transactional: bool,
        prefix: String,
        content: Bytes,
    },
    StreamStart {
        xid: u32,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        commit_lsn: u64,
        end_lsn: u64,
        commit_ts: i64,
    },
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
}

impl Logical {
    /// The (sub)transaction of a message inside a stream block (protocol v2).
    pub fn stream_xid(&self) -> Option<u32> {
        match self {
            Logical::Relation { xid, .. }
            | Logical::Type { xid, .. }
            | Logical::Insert { xid, .. }
            | Logical::Update { xid, .. }
            | Logical::Delete { xid, .. }
            | Logical::Truncate { xid, .. }
            | Logical::Message { xid, .. } => *xid,
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("pgoutput: {0}")]
pub struct DecodeError(pub String);

/// Reads a COPY BOTH payload.
pub fn frame(data: Bytes) -> Result<Frame, DecodeError> {
    let mut r = Reader::new(data);
    match r.u8()? {
        b'w' => {
            let start = r.u64()?;
            let end = r.u64()?;
            let _sent = r.u64()?;
            Ok(Frame::XLogData {
                start,
                end,
                data: r.rest(),
            })
        }
        b'k' => {
            let end = r.u64()?;
            let _sent = r.u64()?;
            let reply = r.u8()? == 1;
            Ok(Frame::Keepalive { end, reply })
        }
        t => Err(DecodeError(format!(
            "unknown replication frame {:?}",
            t as char
        ))),
    }
}

/// Decodes logical messages; remembers whether it is inside a stream block, where
/// messages carry an xid.
#[derive(Default)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    /// A decoder for messages kept from inside a stream block, read back later.
    pub fn in_stream() -> Self {
        Self { in_stream: true }
    }

    pub fn decode(&mut self, data: Bytes) -> Result<Logical, DecodeError> {
        let mut r = Reader::new(data);
        let tag = r.u8()?;
        let xid = |r: &mut Reader, in_stream: bool| -> Result<Option<u32>, DecodeError> {
            if in_stream {
                r.u32().map(Some)
            } else {
                Ok(None)
            }
        };
        let m = match tag {
            b'B' => Logical::Begin {
                final_lsn: r.u64()?,
                commit_ts: r.i64()?,
                xid: r.u32()?,
            },
            b'C' => {
                let _flags = r.u8()?;
                Logical::Commit {
                    commit_lsn: r.u64()?,
                    end_lsn: r.u64()?,
                    commit_ts: r.i64()?,
                }
            }
            b'O' => Logical::Origin,
            b'R' => {
                let xid = xid(&mut r, self.in_stream)?;
                Logical::Relation {
                    xid,
                    relation: relation(&mut r)?,
                }
            }
            b'Y' => {
                let xid = xid(&mut r, self.in_stream)?;
                let oid = r.u32()?;
                let _namespace = r.cstr()?;
                Logical::Type {
                    xid,
                    oid,
                    name: r.cstr()?,
                }
            }
            b'I' => {
                let xid = xid(&mut r, self.in_stream)?;
                let relation = r.u32()?;
                r.expect(b'N')?;
                Logical::Insert {
                    xid,
                    relation,
                    new: tuple(&mut r)?,
                }
            }
            b'U' => {
                let xid = xid(&mut r, self.in_stream)?;
                let relation = r.u32()?;
                let mut kind = r.u8()?;
                let old = if kind == b'K' || kind == b'O' {
                    let old = tuple(&mut r)?;
                    let k = kind;
                    kind = r.u8()?;
                    Some((k, old))
                } else {
                    None
                };
                if kind != b'N' {
                    return Err(DecodeError(format!(
                        "update: expected the new tuple, found {:?}",
                        kind as char
                    )));
                }
                Logical::Update {
                    xid,
                    relation,
                    old,
                    new: tuple(&mut r)?,
                }
            }
            b'D' => {
                let xid = xid(&mut r, self.in_stream)?;
                let relation = r.u32()?;
                let kind = r.u8()?;
                if kind != b'K' && kind != b'O' {
                    return Err(DecodeError(format!(
                        "delete: expected the old key or row, found {:?}",
                        kind as char
                    )));
                }
                Logical::Delete {
                    xid,
                    relation,
                    old: (kind, tuple(&mut r)?),
                }
            }
            b'T' => {
                let xid = xid(&mut r, self.in_stream)?;
                let n = r.u32()?;
                let options = r.u8()?;
                let relations = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
                Logical::Truncate {
                    xid,
                    relations,
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                }
            }
            b'M' => {
                let xid = xid(&mut r, self.in_stream)?;
                let transactional = r.u8()? & 1 != 0;
                let _lsn = r.u64()?;
                let prefix = r.cstr()?;
                let len = r.u32()? as usize;
                Logical::Message {
                    xid,
                    transactional,
                    prefix,
                    content: r.bytes(len)?,
                }
            }
            b'S' => {
                self.in_stream = true;
                let xid = r.u32()?;
                let _first = r.u8()?;
                Logical::StreamStart { xid }
            }
            b'E' => {
                self.in_stream = false;
                Logical::StreamStop
            }
            b'c' => {
                let xid = r.u32()?;
                let _flags = r.u8()?;
                Logical::StreamCommit {
                    xid,
                    commit_lsn: r.u64()?,
                    end_lsn: r.u64()?,
                    commit_ts: r.i64()?,
                }
            }
            b'A' => Logical::StreamAbort {
                xid: r.u32()?,
                subxid: r.u32()?,
            },
            t => {
                return Err(DecodeError(format!(
                    "unknown logical message {:?}",
                    t as char
                )))
            }
        };
        Ok(m)
    }
}

fn relation(r: &mut Reader) -> Result<Relation, DecodeError> {
    let id = r.u32()?;
    let namespace = r.cstr()?;
    let name = r.cstr()?;
    let replica_identity = r.u8()?;
    let n = r.u16()?;
    let mut columns = Vec::with_capacity(n as usize);
    for _ in 0..n {
        columns.push(RelationColumn {
            key: r.u8()? & 1 != 0,
            name: r.cstr()?,
            type_oid: r.u32()?,
            type_modifier: r.u32()? as i32,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn tuple(r: &mut Reader) -> Result<Vec<Datum>, DecodeError> {
    let n = r.u16()?;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        out.push(match r.u8()? {
            b'n' => Datum::Null,
            b'u' => Datum::Unchanged,
            b't' => {
                let len = r.u32()? as usize;
                Datum::Text(r.bytes(len)?)
            }
            b'b' => {
                return Err(DecodeError(
                    "a binary column value (chgate asks for text values)".into(),
                ))
            }
            t => {
                return Err(DecodeError(format!(
                    "unknown tuple column kind {:?}",
                    t as char
                )))
            }
        });
    }
    Ok(out)
}

/// A bounds-checked cursor over a message.
struct Reader {
    data: Bytes,
    at: usize,
}

impl Reader {
    fn new(data: Bytes) -> Self {
        Self { data, at: 0 }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.at + N;
        let s = self
            .data
            .get(self.at..end)
            .ok_or_else(|| DecodeError("the message ends early".into()))?;
        self.at = end;
        let mut out = [0; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take()?))
    }

    fn expect(&mut self, tag: u8) -> Result<(), DecodeError> {
        let t = self.u8()?;
        if t == tag {
            Ok(())
        } else {
            Err(DecodeError(format!(
                "expected {:?}, found {:?}",
                tag as char, t as char
            )))
        }
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.at.min(self.data.len())..];
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError("a name has no terminating NUL".into()))?;
        let s = String::from_utf8_lossy(&rest[..nul]).into_owned();
        self.at += nul + 1;
        Ok(s)
    }

    fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| DecodeError("a value runs past the end of the message".into()))?;
        let out = self.data.slice(self.at..end);
        self.at = end;
        Ok(out)
    }

    fn rest(&mut self) -> Bytes {
        let out = self.data.slice(self.at.min(self.data.len())..);
        self.at = self.data.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn relation_message() -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(16384);
        b.put_slice(b"public\0orders\0");
        b.put_u8(b'd');
        b.put_u16(2);
        b.put_u8(1);
        b.put_slice(b"id\0");
        b.put_u32(20);
        b.put_i32(-1);
        b.put_u8(0);
        b.put_slice(b"note\0");
        b.put_u32(25);
        b.put_i32(-1);
        b.freeze()
    }

    #[test]
    fn relations_and_updates_decode() {
        let mut d = Decoder::default();
        let Logical::Relation { xid, relation } = d.decode(relation_message()).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(xid, None);
        assert_eq!(relation.name, "orders");
        assert!(relation.columns[0].key && !relation.columns[1].key);

        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(16384);
        b.put_u8(b'N');
        b.put_u16(2);
        b.put_u8(b't');
        b.put_u32(1);
        b.put_slice(b"7");
        b.put_u8(b'u');
        let m = d.decode(b.freeze()).unwrap();
        assert_eq!(
            m,
            Logical::Update {
                xid: None,
                relation: 16384,
                old: None,
                new: vec![Datum::Text(Bytes::from_static(b"7")), Datum::Unchanged],
            }
        );
    }

    #[test]
    fn stream_blocks_carry_xids() {
        let mut d = Decoder::default();
        let mut b = BytesMut::new();
        b.put_u8(b'S');
        b.put_u32(900);
        b.put_u8(1);
        assert_eq!(
            d.decode(b.freeze()).unwrap(),
            Logical::StreamStart { xid: 900 }
        );
        let mut b = BytesMut::new();
        b.put_u8(b'D');
        b.put_u32(900);
        b.put_u32(16384);
        b.put_u8(b'K');
        b.put_u16(1);
        b.put_u8(b'n');
        let Logical::Delete { xid, .. } = d.decode(b.freeze()).unwrap() else {
            panic!()
        };
        assert_eq!(xid, Some(900));
        d.decode(Bytes::from_static(b"E")).unwrap();
        assert!(!d.in_stream);
    }

    #[test]
    fn every_truncation_of_a_message_is_an_error_not_a_panic() {
        let whole = relation_message();
        for cut in 0..whole.len() {
            assert!(
                Decoder::default().decode(whole.slice(..cut)).is_err(),
                "cut {cut}"
            );
        }
        assert!(frame(Bytes::from_static(b"w\0\0")).is_err());
        assert!(frame(Bytes::from_static(b"?")).is_err());
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_u16(1);
        b.put_u8(b't');
        b.put_u32(u32::MAX);
        assert!(Decoder::default().decode(b.freeze()).is_err());
    }
}
