//! A PostgreSQL connection in replication mode (`replication=database`): the startup and
//! authentication exchange (trust, cleartext, MD5, SCRAM-SHA-256), the simple-query protocol
//! for the replication commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`), and the
//! COPY BOTH stream `START_REPLICATION` opens.
//!
//! tokio-postgres, which chgate uses for catalog queries and the snapshot, has no replication
//! mode; `postgres-protocol` (its sans-I/O half) encodes and parses the messages here, so the
//! two share one implementation of the wire format and of SCRAM.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::tls::PgTls;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: String,
    pub connect_timeout: Duration,
    pub tls: PgTls,
}

/// An error from the server (its SQLSTATE and message) or from the connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("PostgreSQL: {severity} {code}: {message}")]
    Server {
        severity: String,
        code: String,
        message: String,
    },
    #[error("PostgreSQL connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL protocol: {0}")]
    Protocol(String),
}

impl WireError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            WireError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The options every chgate session sets, so text values come in one known shape:
/// ISO dates in UTC, hex bytea, floats exactly.
pub const SESSION_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC -c intervalstyle=iso_8601 -c extra_float_digits=3 -c bytea_output=hex";

/// The connection's bytes: TLS or plain.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Asks the server for TLS (`SSLRequest`) and shakes hands if it agrees; a server that
/// does not is refused if the mode requires TLS, else spoken to in plain.
async fn negotiate(mut tcp: TcpStream, params: &ConnectParams) -> Result<Stream, WireError> {
    if !params.tls.wanted() {
        return Ok(Stream::Plain(tcp));
    }
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let tls = params.tls.handshake(&params.host, tcp).await.map_err(|e| {
                WireError::Protocol(format!(
                    "TLS with {}:{} (sslmode = \"{}\"): {e}",
                    params.host,
                    params.port,
                    params.tls.mode().as_str()
                ))
            })?;
            Ok(Stream::Tls(Box::new(tls)))
        }
        b'N' if !params.tls.required() => Ok(Stream::Plain(tcp)),
        b'N' => Err(WireError::Protocol(format!(
            "{}:{} does not offer TLS, and sslmode = \"{}\" requires it",
            params.host,
            params.port,
            params.tls.mode().as_str()
        ))),
        other => Err(WireError::Protocol(format!(
            "the server answered the TLS request with {other:#04x}, neither S nor N"
        ))),
    }
}

/// A connection in replication mode.
pub struct ReplicationConn {
    stream: Stream,
    read: BytesMut,
    write: BytesMut,
    /// `server_version_num`-style number from the `server_version` parameter (150004).
    pub server_version: u32,
}

/// One row of a simple query's answer, as text.
pub type TextRow = Vec<Option<String>>;

impl ReplicationConn {
    pub async fn connect(params: &ConnectParams) -> Result<Self, WireError> {
        let addr = format!("{}:{}", params.host, params.port);
        let stream = tokio::time::timeout(params.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| WireError::Protocol(format!("connecting to {addr} timed out")))??;
        stream.set_nodelay(true)?;
        let stream = tokio::time::timeout(params.connect_timeout, negotiate(stream, params))
            .await
            .map_err(|_| {
                WireError::Protocol(format!("the TLS handshake with {addr} timed out"))
            })??;
        let mut conn = Self {
            stream,
            read: BytesMut::with_capacity(64 << 10),
            write: BytesMut::with_capacity(4 << 10),
            server_version: 0,
        };
        let startup = [
            ("user", params.user.as_str()),
            ("database", params.dbname.as_str()),
            ("replication", "database"),
            ("application_name", params.application_name.as_str()),
            ("options", SESSION_OPTIONS),
        ];
        frontend::startup_message(startup.iter().copied(), &mut conn.write)?;
        conn.flush().await?;
        conn.authenticate(params).await?;
        conn.until_ready().await?;
        Ok(conn)
    }

    async fn authenticate(&mut self, params: &ConnectParams) -> Result<(), WireError> {
        let password = || {
            params.password.clone().ok_or_else(|| {
                WireError::Protocol(format!(
                    "the server asks user {:?} for a password and none is configured",
                    params.user
                ))
            })
        };
        loop {
            match self.next().await? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.write)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        params.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram = false;
                    while let Some(m) = mechanisms.next()? {
                        scram |= m == SCRAM_SHA_256;
                    }
                    if !scram {
                        return Err(WireError::Protocol(
                            "the server offers no SASL mechanism chgate speaks (SCRAM-SHA-256)"
                                .into(),
                        ));
                    }
                    self.scram(password()?.as_bytes()).await?;
                }
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => {
                    return Err(WireError::Protocol(
                        "the server asks for an authentication method chgate does not speak (GSSAPI, SSPI or Kerberos)".into(),
                    ))
                }
            }
        }
    }

    async fn scram(&mut self, password: &[u8]) -> Result<(), WireError> {
        let mut scram = ScramSha256::new(password, ChannelBinding::unsupported());
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut self.write)?;
        self.flush().await?;
        match self.next().await? {
            Message::AuthenticationSaslContinue(body) => scram.update(body.data())?,
            Message::ErrorResponse(body) => return Err(server_error(&body)),
            _ => {
                return Err(WireError::Protocol(
                    "unexpected message during SCRAM".into(),
                ))
            }
        }
        frontend::sasl_response(scram.message(), &mut self.write)?;
        self.flush().await?;
        match self.next().await? {
            Message::AuthenticationSaslFinal(body) => scram.finish(body.data())?,
            Message::ErrorResponse(body) => return Err(server_error(&body)),
            _ => {
                return Err(WireError::Protocol(
                    "unexpected message during SCRAM".into(),
                ))
            }
        }
        Ok(())
    }

    /// Reads up to ReadyForQuery, keeping the server version.
    async fn until_ready(&mut self) -> Result<(), WireError> {
        loop {
            match self.next().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ParameterStatus(p) if p.name()? == "server_version" => {
                    self.server_version = version_number(p.value()?);
                }
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => {}
            }
        }
    }

    /// Runs one statement with the simple-query protocol; returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, WireError> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next().await? {
                Message::DataRow(body) => rows.push(data_row(body.buffer())?),
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Sends `START_REPLICATION ...` and waits for the COPY BOTH stream to open.
    pub async fn start_replication(&mut self, sql: &str) -> Result<(), WireError> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        loop {
            // postgres-protocol's parser does not know CopyBothResponse ('W'): it is taken
            // off the buffer here, before the parser sees it.
            if self.take_copy_both().await? {
                return Ok(());
            }
            match self.next().await? {
                Message::ErrorResponse(body) => {
                    let e = server_error(&body);
                    // The server still sends ReadyForQuery after the error.
                    let _ = self.drain_to_ready().await;
                    return Err(e);
                }
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
                _ => {
                    return Err(WireError::Protocol(
                        "unexpected answer to START_REPLICATION".into(),
                    ))
                }
            }
        }
    }

    /// True (and the message consumed) if the next message is a CopyBothResponse.
    async fn take_copy_both(&mut self) -> Result<bool, WireError> {
        while self.read.len() < 5 {
            self.fill().await?;
        }
        if self.read[0] != b'W' {
            return Ok(false);
        }
        let len = u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]);
        if !(4..=1 << 20).contains(&len) {
            return Err(WireError::Protocol(format!(
                "a CopyBothResponse of {len} bytes"
            )));
        }
        let total = 1 + len as usize;
        while self.read.len() < total {
            self.fill().await?;
        }
        self.read.advance(total);
        Ok(true)
    }

    async fn drain_to_ready(&mut self) -> Result<(), WireError> {
        loop {
            if let Message::ReadyForQuery(_) = self.next().await? {
                return Ok(());
            }
        }
    }

    /// The next CopyData payload of the replication stream; `None` when the server ends it.
    pub async fn copy_data(&mut self) -> Result<Option<Bytes>, WireError> {
        loop {
            match self.next().await? {
                Message::CopyData(body) => return Ok(Some(body.into_bytes())),
                Message::CopyDone => return Ok(None),
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
                _ => {
                    return Err(WireError::Protocol(
                        "unexpected message in the replication stream".into(),
                    ))
                }
            }
        }
    }

    /// Sends a Standby Status Update: everything up to `flushed` is safe downstream, so
    /// the server may release the WAL before it.
    pub async fn send_status(&mut self, flushed: u64, reply: bool) -> Result<(), WireError> {
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(flushed); // written
        msg.put_u64(flushed); // flushed
        msg.put_u64(flushed); // applied
        msg.put_i64(pg_now_micros());
        msg.put_u8(u8::from(reply));
        frontend::CopyData::new(msg.freeze())?.write(&mut self.write);
        self.flush().await?;
        Ok(())
    }

    /// Ends the stream and the session.
    pub async fn close(mut self) {
        frontend::copy_done(&mut self.write);
        frontend::terminate(&mut self.write);
        let _ = self.flush().await;
    }

    async fn flush(&mut self) -> Result<(), WireError> {
        if !self.write.is_empty() {
            self.stream.write_all(&self.write).await?;
            self.write.clear();
        }
        Ok(())
    }

    async fn next(&mut self) -> Result<Message, WireError> {
        loop {
            if let Some(m) = Message::parse(&mut self.read)? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), WireError> {
        if self.read.capacity() - self.read.len() < 8 << 10 {
            self.read.reserve(64 << 10);
        }
        if self.stream.read_buf(&mut self.read).await? == 0 {
            return Err(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )));
        }
        Ok(())
    }
}

fn server_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> WireError {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'S' => severity = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    WireError::Server {
        severity,
        code,
        message,
    }
}

/// A DataRow body after its column count: (i32 length, bytes) per column, -1 for NULL.
fn data_row(mut buf: &[u8]) -> Result<TextRow, WireError> {
    let mut row = Vec::new();
    while buf.remaining() >= 4 {
        let len = buf.get_i32();
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if buf.remaining() < len {
            return Err(WireError::Protocol("a DataRow ends inside a value".into()));
        }
        row.push(Some(String::from_utf8_lossy(&buf[..len]).into_owned()));
        buf.advance(len);
    }
    Ok(row)
}

/// "15.4 (Debian 15.4-1)" -> 150004; "9.6.24" -> 90624.
pub fn version_number(v: &str) -> u32 {
    let digits: Vec<u32> = v
        .split(|c: char| !c.is_ascii_digit())
        .take_while(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    match digits.as_slice() {
        [major, minor, patch, ..] if *major < 10 => major * 10000 + minor * 100 + patch,
        [major, minor, ..] => major * 10000 + minor,
        [major] => major * 10000,
        [] => 0,
    }
}

/// Microseconds since PostgreSQL's epoch (2000-01-01 UTC).
pub fn pg_now_micros() -> i64 {
    const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_micros() as i64 - PG_EPOCH_UNIX_SECS * 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_are_numbers() {
        assert_eq!(version_number("15.4 (Debian 15.4-1.pgdg120+1)"), 150004);
        assert_eq!(version_number("16.0"), 160000);
        assert_eq!(version_number("9.6.24"), 90624);
        assert_eq!(version_number("17devel"), 170000);
        assert_eq!(version_number("nonsense"), 0);
    }

    #[test]
    fn data_rows_are_split_into_text_and_null() {
        let mut buf = BytesMut::new();
        buf.put_i32(2);
        buf.put_slice(b"ab");
        buf.put_i32(-1);
        buf.put_i32(0);
        assert_eq!(
            data_row(&buf).unwrap(),
            vec![Some("ab".into()), None, Some(String::new())]
        );
        let mut cut = BytesMut::new();
        cut.put_i32(5);
        cut.put_slice(b"ab");
        assert!(data_row(&cut).is_err());
    }
}
