//! A transaction the server streams before its commit (protocol v2), kept until its Stream
//! Commit: its messages as they came, in memory up to a limit (`capture.spill_bytes`), past
//! it in a file under the state directory, so a transaction bigger than memory is read back
//! from disk when it commits. A rolled-back subtransaction's messages are skipped on the way
//! back; a rolled-back transaction's file is deleted.
//!
//! A record is `subxid u32 | lsn u64 | len u32 | message` (little-endian). The files are
//! scratch: after a crash the server streams the transaction again from its start, so
//! [`clear`] empties the directory when streaming starts.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

const HEADER: usize = 16;

/// One streamed transaction's messages so far.
pub struct Streamed {
    xid: u32,
    dir: PathBuf,
    limit: usize,
    buf: Vec<u8>,
    file: Option<(PathBuf, BufWriter<File>)>,
    aborted: HashSet<u32>,
    spilled: u64,
}

impl Streamed {
    /// Holds up to `limit` bytes in memory; past that, writes to a file in `dir`.
    pub fn new(xid: u32, dir: &Path, limit: usize) -> Self {
        Self {
            xid,
            dir: dir.to_path_buf(),
            limit,
            buf: Vec::new(),
            file: None,
            aborted: HashSet::new(),
            spilled: 0,
        }
    }

    /// Adds a message of subtransaction `subxid` (the top-level xid for its own changes).
    pub fn push(&mut self, subxid: u32, lsn: u64, message: &[u8]) -> io::Result<()> {
        let len = u32::try_from(message.len())
            .map_err(|_| io::Error::other("a logical message over 4 GiB"))?;
        self.buf.extend_from_slice(&subxid.to_le_bytes());
        self.buf.extend_from_slice(&lsn.to_le_bytes());
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(message);
        if self.buf.len() >= self.limit {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            let path = self.dir.join(format!("xid-{}.spill", self.xid));
            let file = File::create(&path)?;
            self.file = Some((path, BufWriter::with_capacity(1 << 20, file)));
        }
        if let Some((_, w)) = &mut self.file {
            w.write_all(&self.buf)?;
        }
        self.spilled += self.buf.len() as u64;
        crate::metrics::METRICS
            .cdc_spilled_bytes
            .inc_by(self.buf.len() as u64);
        self.buf.clear();
        Ok(())
    }

    /// Bytes written to disk so far.
    pub fn spilled(&self) -> u64 {
        self.spilled
    }

    /// A subtransaction rolled back: its messages are skipped.
    pub fn abort_subtransaction(&mut self, subxid: u32) {
        self.aborted.insert(subxid);
    }

    /// The messages in order, minus rolled-back subtransactions': `(lsn, message)`.
    pub fn replay(mut self) -> io::Result<Replay> {
        let file = match self.file.take() {
            Some((path, w)) => {
                drop(w.into_inner().map_err(|e| e.into_error())?);
                let reader = BufReader::with_capacity(1 << 20, File::open(&path)?);
                Some((path, reader))
            }
            None => None,
        };
        Ok(Replay {
            file,
            tail: Bytes::from(std::mem::take(&mut self.buf)),
            aborted: std::mem::take(&mut self.aborted),
        })
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        if let Some((path, _)) = self.file.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A streamed transaction read back: the file's records, then the memory's.
pub struct Replay {
    file: Option<(PathBuf, BufReader<File>)>,
    tail: Bytes,
    aborted: HashSet<u32>,
}

impl Replay {
    /// The next message not rolled back, or `None` at the end. A rolled-back
    /// subtransaction's table descriptions go with it, and rightly: pgoutput forgets at
    /// every stream abort which tables it described in the transaction
    /// (`cleanup_rel_sync_cache` on the top-level xid), so a table used again after the
    /// rollback is described again, as it is then (an `ALTER` inside the rolled-back
    /// subtransaction is not in it).
    pub fn next_message(&mut self) -> io::Result<Option<(u64, Bytes)>> {
        loop {
            let Some((subxid, lsn, message)) = self.next_record()? else {
                return Ok(None);
            };
            if !self.aborted.contains(&subxid) {
                return Ok(Some((lsn, message)));
            }
        }
    }

    fn next_record(&mut self) -> io::Result<Option<(u32, u64, Bytes)>> {
        if let Some((_, reader)) = &mut self.file {
            let mut header = [0u8; HEADER];
            match read_full(reader, &mut header)? {
                0 => {
                    if let Some((path, _)) = self.file.take() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                HEADER => {
                    let (subxid, lsn, len) = parse_header(&header);
                    let mut message = vec![0u8; len];
                    reader.read_exact(&mut message)?;
                    return Ok(Some((subxid, lsn, Bytes::from(message))));
                }
                _ => return Err(truncated()),
            }
        }
        if self.tail.is_empty() {
            return Ok(None);
        }
        if self.tail.len() < HEADER {
            return Err(truncated());
        }
        let header: [u8; HEADER] = self.tail[..HEADER].try_into().map_err(|_| truncated())?;
        let (subxid, lsn, len) = parse_header(&header);
        if self.tail.len() < HEADER + len {
            return Err(truncated());
        }
        let message = self.tail.slice(HEADER..HEADER + len);
        self.tail = self.tail.slice(HEADER + len..);
        Ok(Some((subxid, lsn, message)))
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        if let Some((path, _)) = self.file.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn parse_header(h: &[u8; HEADER]) -> (u32, u64, usize) {
    let subxid = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let lsn = u64::from_le_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
    let len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as usize;
    (subxid, lsn, len)
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "a streamed transaction's spill record is cut short",
    )
}

/// Reads until `buf` is full or the end: how many bytes it got.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Empties the spill directory: what a crashed run left is streamed again by the server.
pub fn clear(dir: &Path) -> io::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".spill") {
                    std::fs::remove_file(e.path())?;
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(mut r: Replay) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((lsn, m)) = r.next_message().unwrap() {
            out.push((lsn, m.to_vec()));
        }
        out
    }

    #[test]
    fn messages_come_back_in_order_from_disk_and_memory_minus_rolled_back_subtransactions() {
        let dir = std::env::temp_dir().join(format!("chgate-spill-{}", std::process::id()));
        let mut s = Streamed::new(7, &dir, 64);
        let mut want = Vec::new();
        for i in 0..100u64 {
            let sub = if i % 10 == 3 { 8 } else { 7 };
            let m = vec![i as u8; (i % 13) as usize];
            s.push(sub, 1000 + i, &m).unwrap();
            if sub == 7 {
                want.push((1000 + i, m));
            }
        }
        s.abort_subtransaction(8);
        assert!(s.spilled() > 0, "past the limit it went to disk");
        let path = dir.join("xid-7.spill");
        assert!(path.exists());
        assert_eq!(all(s.replay().unwrap()), want);
        assert!(!path.exists(), "the file goes once read");

        // Under the limit: memory only; a dropped (rolled back) transaction leaves nothing.
        let mut small = Streamed::new(9, &dir, 1 << 20);
        small.push(9, 1, b"x").unwrap();
        assert_eq!(small.spilled(), 0);
        assert_eq!(all(small.replay().unwrap()), vec![(1, b"x".to_vec())]);
        let mut gone = Streamed::new(10, &dir, 1);
        gone.push(10, 1, b"abc").unwrap();
        assert!(dir.join("xid-10.spill").exists());
        drop(gone);
        assert!(!dir.join("xid-10.spill").exists());
        std::fs::write(dir.join("xid-11.spill"), b"left by a crash").unwrap();
        clear(&dir).unwrap();
        assert!(!dir.join("xid-11.spill").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("chgate-spill-bad-{}", std::process::id()));
        let mut s = Streamed::new(1, &dir, 1);
        s.push(1, 5, b"hello").unwrap();
        let path = dir.join("xid-1.spill");
        // Cut the record short before it is read back.
        if let Some((_, w)) = &mut s.file {
            w.flush().unwrap();
        }
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        let mut r = s.replay().unwrap();
        assert!(r.next_message().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
