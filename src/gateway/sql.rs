//! Just enough SQL lexing to tell a read from everything else.
//!
//! The gateway needs the kind of a statement for two decisions: refusing non-reads from
//! read-only users, and retrying a failed read on another node. Both only need the first
//! keyword, after whitespace, comments and opening parentheses. Anything that is not
//! recognisably a read counts as a write (the safe side for both decisions); the server's
//! own `readonly` setting stays in place as a second guard.

/// What a statement is, as far as routing and policy care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    /// SELECT, WITH, SHOW, DESC/DESCRIBE, EXISTS, EXPLAIN.
    Read,
    /// Anything else, including text we cannot make sense of.
    Write,
    /// The text ended before the first keyword did; more input may tell.
    Incomplete,
}

/// A statement as the gateway decides on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statement {
    Read,
    Write,
    /// The frontend could not look into the query (a compressed body). Routed and retried
    /// like a write; not refused to read-only users, whose queries the server guards too
    /// (`readonly` upstream).
    Unknown,
}

impl Statement {
    /// True only for a statement known to be a read.
    pub fn is_read(self) -> bool {
        self == Statement::Read
    }
}

const READ_KEYWORDS: &[&[u8]] = &[
    b"SELECT",
    b"WITH",
    b"SHOW",
    b"DESC",
    b"DESCRIBE",
    b"EXISTS",
    b"EXPLAIN",
];

/// Classifies the statement at the start of `text`. `complete` says whether `text` is the
/// whole statement (then the answer is never `Incomplete`).
pub fn classify(text: &[u8], complete: bool) -> StatementKind {
    let incomplete = if complete {
        StatementKind::Write
    } else {
        StatementKind::Incomplete
    };
    let Some(start) = skip_trivia(text, 0) else {
        return incomplete;
    };
    if start >= text.len() {
        return incomplete;
    }
    let end = word_end(text, start);
    if end == text.len() && !complete {
        // The keyword may continue in the next chunk ("SEL" + "ECT").
        return StatementKind::Incomplete;
    }
    let word = &text[start..end];
    if READ_KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(word)) {
        StatementKind::Read
    } else {
        StatementKind::Write
    }
}

/// What a statement does to the session it runs in (the native protocol's connection),
/// which a connection moved to another node must carry over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEffect {
    None,
    /// `SET ...`: replayed on a new connection.
    Set,
    /// `USE db`: the new connection starts in `db`.
    Use(String),
    /// `CREATE TEMPORARY TABLE ...`: the session holds data only its node has.
    Temporary,
}

/// What the whole statement `text` does to its session.
pub fn session_effect(text: &[u8]) -> SessionEffect {
    let Some(first) = skip_trivia(text, 0).filter(|&i| i < text.len()) else {
        return SessionEffect::None;
    };
    let first_end = word_end(text, first);
    let word = &text[first..first_end];
    let next = || {
        let i = skip_trivia(text, first_end)?;
        (i < text.len()).then_some(i)
    };
    if word.eq_ignore_ascii_case(b"SET") {
        SessionEffect::Set
    } else if word.eq_ignore_ascii_case(b"USE") {
        match next().and_then(|i| identifier(text, i)) {
            Some(db) => SessionEffect::Use(db),
            None => SessionEffect::None,
        }
    } else if word.eq_ignore_ascii_case(b"CREATE") {
        match next() {
            Some(i) if text[i..word_end(text, i)].eq_ignore_ascii_case(b"TEMPORARY") => {
                SessionEffect::Temporary
            }
            _ => SessionEffect::None,
        }
    } else {
        SessionEffect::None
    }
}

/// An identifier at `i`: bare, in backquotes or in double quotes (with `\\` escapes and
/// doubled quotes); `None` if there is none or it does not end.
fn identifier(text: &[u8], i: usize) -> Option<String> {
    let quote = text[i];
    if quote != b'`' && quote != b'"' {
        let end = word_end(text, i);
        return (end > i).then(|| String::from_utf8_lossy(&text[i..end]).into_owned());
    }
    let mut out = Vec::new();
    let mut j = i + 1;
    while j < text.len() {
        match text[j] {
            b'\\' => {
                out.push(*text.get(j + 1)?);
                j += 2;
            }
            c if c == quote => {
                if text.get(j + 1) == Some(&quote) {
                    out.push(quote);
                    j += 2;
                } else {
                    return String::from_utf8(out).ok();
                }
            }
            c => {
                out.push(c);
                j += 1;
            }
        }
    }
    None
}

/// The end of the word (letters, digits, `_`) starting at `i`.
fn word_end(text: &[u8], mut i: usize) -> usize {
    while i < text.len() && (text[i].is_ascii_alphanumeric() || text[i] == b'_') {
        i += 1;
    }
    i
}

/// The position after whitespace, opening parentheses and comments from `i`; `None` if a
/// comment does not end within `text`.
fn skip_trivia(text: &[u8], mut i: usize) -> Option<usize> {
    let n = text.len();
    while i < n {
        let c = text[i];
        if c.is_ascii_whitespace() || c == b'(' {
            i += 1;
        } else if c == b'-' && text.get(i + 1) == Some(&b'-') || c == b'#' {
            i += text[i..].iter().position(|&b| b == b'\n')? + 1;
        } else if c == b'/' && text.get(i + 1) == Some(&b'*') {
            // A block comment with another `/*` inside is read differently by the servers:
            // ClickHouse 18.16 ends it at the first `*/`, later versions nest comments. So
            // the statement is not looked into past it: its "first word" is the comment
            // itself, which is not a read.
            let start = i;
            i += 2;
            loop {
                if i + 1 >= n {
                    return None;
                }
                if text[i] == b'/' && text[i + 1] == b'*' {
                    return Some(start);
                } else if text[i] == b'*' && text[i + 1] == b'/' {
                    i += 2;
                    break;
                } else {
                    i += 1;
                }
            }
        } else {
            break;
        }
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::StatementKind::*;
    use super::*;

    #[test]
    fn reads() {
        for q in [
            "SELECT 1",
            "  select 1",
            "(SELECT 1) UNION ALL (SELECT 2)",
            "WITH 1 AS x SELECT x",
            "show tables",
            "DESC t",
            "describe table t",
            "EXISTS TABLE t",
            "EXPLAIN SELECT 1",
            "-- hi\nSELECT 1",
            "# hi\nSELECT 1",
            "/* a */ /* b */ SELECT 1",
        ] {
            assert_eq!(classify(q.as_bytes(), true), Read, "{q}");
        }
    }

    #[test]
    fn writes_and_everything_else() {
        for q in [
            "INSERT INTO t VALUES (1)",
            "insert into t format TSV",
            "CREATE TABLE t (x UInt8) ENGINE = Memory",
            "DROP TABLE t",
            "ALTER TABLE t DELETE WHERE 1",
            "SET max_threads = 1",
            "SYSTEM STOP MERGES",
            "KILL QUERY WHERE 1",
            "OPTIMIZE TABLE t",
            "TRUNCATE TABLE t",
            "SELECTX 1",
            "/* x */ /* y */ INSERT INTO t VALUES",
            // Read one way by 18.16 (an INSERT), the other by nesting servers.
            "/* /* */ INSERT INTO t SELECT '*/ SELECT 1",
            "/* a /* nested */ comment */ SELECT 1",
            "/* unterminated",
            "",
            "   ",
            "\u{feff}SELECT 1",
            "🙂",
        ] {
            assert_eq!(classify(q.as_bytes(), true), Write, "{q}");
        }
        // Nesting: the comment only ends at the second "*/".
        assert_eq!(classify(b"/* /* */ SELECT */ INSERT INTO t", true), Write);
    }

    #[test]
    fn incomplete_until_the_keyword_is_whole() {
        assert_eq!(classify(b"", false), Incomplete);
        assert_eq!(classify(b"  -- comment", false), Incomplete);
        assert_eq!(classify(b"/* x ", false), Incomplete);
        assert_eq!(classify(b"SEL", false), Incomplete);
        assert_eq!(classify(b"SEL", true), Write);
        assert_eq!(classify(b"SELECT", false), Incomplete);
        assert_eq!(classify(b"SELECT ", false), Read);
        assert_eq!(classify(b"INSERT ", false), Write);
    }

    #[test]
    fn session_effects() {
        use super::SessionEffect as E;
        assert_eq!(session_effect(b"SET max_threads = 1"), E::Set);
        assert_eq!(
            session_effect(b" /* x */ set send_logs_level='trace'"),
            E::Set
        );
        assert_eq!(session_effect(b"USE demo"), E::Use("demo".into()));
        assert_eq!(session_effect(b"use `my db`"), E::Use("my db".into()));
        assert_eq!(session_effect(b"USE \"a\"\"b\""), E::Use("a\"b".into()));
        assert_eq!(session_effect(b"USE `unterminated"), E::None);
        assert_eq!(session_effect(b"USE"), E::None);
        assert_eq!(
            session_effect(b"CREATE TEMPORARY TABLE t (x UInt8)"),
            E::Temporary
        );
        assert_eq!(session_effect(b"create temporary table t"), E::Temporary);
        assert_eq!(session_effect(b"CREATE TABLE t (x UInt8)"), E::None);
        assert_eq!(session_effect(b"SELECT 1"), E::None);
        assert_eq!(session_effect(b"SETTINGS"), E::None);
        assert_eq!(session_effect(b""), E::None);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len % 64)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    b"/*-#\n (SELECTinsert"[(seed % 19) as usize]
                })
                .collect();
            let _ = classify(&bytes, len % 2 == 0);
            let _ = session_effect(&bytes);
        }
    }
}
