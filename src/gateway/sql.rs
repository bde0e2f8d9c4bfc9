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
    let mut i = 0;
    let n = text.len();
    while i < n {
        let c = text[i];
        if c.is_ascii_whitespace() || c == b'(' {
            i += 1;
        } else if c == b'-' && text.get(i + 1) == Some(&b'-') || c == b'#' {
            match text[i..].iter().position(|&b| b == b'\n') {
                Some(p) => i += p + 1,
                None => return incomplete,
            }
        } else if c == b'/' && text.get(i + 1) == Some(&b'*') {
            // ClickHouse block comments nest.
            let mut depth = 1usize;
            i += 2;
            loop {
                if i + 1 >= n {
                    return incomplete;
                }
                if text[i] == b'/' && text[i + 1] == b'*' {
                    depth += 1;
                    i += 2;
                } else if text[i] == b'*' && text[i + 1] == b'/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else {
            break;
        }
    }
    if i >= n {
        return incomplete;
    }
    let start = i;
    while i < n && (text[i].is_ascii_alphanumeric() || text[i] == b'_') {
        i += 1;
    }
    if i == n && !complete {
        // The keyword may continue in the next chunk ("SEL" + "ECT").
        return StatementKind::Incomplete;
    }
    let word = &text[start..i];
    if READ_KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(word)) {
        StatementKind::Read
    } else {
        StatementKind::Write
    }
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
            "/* a /* nested */ comment */ SELECT 1",
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
        }
    }
}
