//! Rows and keys as JSON bytes, written straight from PostgreSQL's text values: a row is
//! `{"col":value,...}` in the relation's column order, a key `{"pk":value,...}` in key
//! order. The row bytes are what an event's `after` carries, what the key-state store keeps,
//! and what a later event's `before` is: byte for byte the same, never parsed and written
//! again (only an update with an unchanged TOAST value reads the stored row, for that value).

use bytes::Bytes;
use serde_json::{Map, Value};

use super::pg::pgoutput::Datum;
use super::value::{write_json, write_str, Kind};

/// A relation's columns, ready to write rows and keys.
#[derive(Debug)]
pub struct Layout {
    pub names: Vec<String>,
    pub kinds: Vec<Kind>,
    /// `"name":` per column, escaped.
    prefixes: Vec<Vec<u8>>,
    /// The key's columns, as positions among the columns, in key order.
    pub key: Vec<usize>,
}

impl Layout {
    /// `None` if a key column is not among the columns.
    pub fn new(columns: Vec<(String, Kind)>, key_names: &[String]) -> Option<Self> {
        let key = key_names
            .iter()
            .map(|k| columns.iter().position(|(n, _)| n == k))
            .collect::<Option<Vec<_>>>()?;
        let prefixes = columns
            .iter()
            .map(|(n, _)| {
                let mut p = Vec::with_capacity(n.len() + 3);
                write_str(&mut p, n);
                p.push(b':');
                p
            })
            .collect();
        let (names, kinds) = columns.into_iter().unzip();
        Some(Self {
            names,
            kinds,
            prefixes,
            key,
        })
    }

    /// Writes a tuple as a row. An unchanged TOAST value is taken from `prev` (the stored
    /// row's JSON); without it, or with a tuple of the wrong width, an error says why.
    pub fn row(
        &self,
        datums: &[Datum],
        prev: Option<&str>,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        if datums.len() != self.names.len() {
            return Err(format!(
                "a tuple of {} columns for a relation of {}",
                datums.len(),
                self.names.len()
            ));
        }
        let mut parsed: Option<Map<String, Value>> = None;
        out.push(b'{');
        for (i, d) in datums.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&self.prefixes[i]);
            match d {
                Datum::Null => out.extend_from_slice(b"null"),
                Datum::Text(b) => write_json(out, &self.kinds[i], &text(b)),
                Datum::Unchanged => {
                    if parsed.is_none() {
                        parsed = prev.and_then(|p| serde_json::from_str(p).ok());
                    }
                    match parsed.as_ref().and_then(|p| p.get(&self.names[i])) {
                        Some(v) => {
                            let _ = serde_json::to_writer(&mut *out, v);
                        }
                        None => {
                            return Err(format!(
                                "column {} is an unchanged TOAST value and the key-state store has no earlier row to take it from",
                                self.names[i]
                            ))
                        }
                    }
                }
            }
        }
        out.push(b'}');
        Ok(())
    }

    /// Writes a row of text values, as a snapshot reads them: `value(i)` is column `i`'s
    /// text, `None` for NULL.
    pub fn row_text<'a>(&self, value: impl Fn(usize) -> Option<&'a str>, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, prefix) in self.prefixes.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(prefix);
            match value(i) {
                None => out.extend_from_slice(b"null"),
                Some(t) => write_json(out, &self.kinds[i], t),
            }
        }
        out.push(b'}');
    }

    /// Writes the key of a tuple; false if a key column has no value in it (NULL, or an
    /// unchanged TOAST value).
    pub fn key(&self, datums: &[Datum], out: &mut Vec<u8>) -> bool {
        out.push(b'{');
        for (n, &i) in self.key.iter().enumerate() {
            let Some(Datum::Text(b)) = datums.get(i) else {
                return false;
            };
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&self.prefixes[i]);
            write_json(out, &self.kinds[i], &text(b));
        }
        out.push(b'}');
        true
    }

    /// Writes the key of a row of text values (as [`Layout::row_text`] takes them); false
    /// if a key column is NULL.
    pub fn key_text<'a>(
        &self,
        value: impl Fn(usize) -> Option<&'a str>,
        out: &mut Vec<u8>,
    ) -> bool {
        out.push(b'{');
        for (n, &i) in self.key.iter().enumerate() {
            let Some(t) = value(i) else {
                return false;
            };
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&self.prefixes[i]);
            write_json(out, &self.kinds[i], t);
        }
        out.push(b'}');
        true
    }

    /// A tuple's columns that have values, as a row with NULL for the rest (a key-only
    /// old tuple).
    pub fn partial_row(&self, datums: &[Datum], out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, prefix) in self.prefixes.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(prefix);
            match datums.get(i) {
                Some(Datum::Text(b)) => write_json(out, &self.kinds[i], &text(b)),
                _ => out.extend_from_slice(b"null"),
            }
        }
        out.push(b'}');
    }

    /// The key columns' text values of a tuple.
    pub fn key_values(&self, datums: &[Datum]) -> Option<Vec<Option<String>>> {
        self.key
            .iter()
            .map(|&i| match datums.get(i)? {
                Datum::Text(b) => Some(Some(text(b).into_owned())),
                _ => Some(None),
            })
            .collect()
    }
}

fn text(b: &Bytes) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(b)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::cdc::pg::pgoutput::Datum;
    use crate::cdc::row::Layout;
    use crate::cdc::value::Kind;

    fn layout() -> Layout {
        Layout::new(
            vec![
                ("id".into(), Kind::Int),
                ("note".into(), Kind::Text),
                ("k2".into(), Kind::Text),
            ],
            &["k2".to_string(), "id".to_string()],
        )
        .unwrap()
    }

    fn t(s: &'static str) -> Datum {
        Datum::Text(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn rows_and_keys_are_json_in_their_orders() {
        let l = layout();
        let mut row = Vec::new();
        l.row(&[t("7"), t("a \"b\""), t("x")], None, &mut row)
            .unwrap();
        assert_eq!(row, br#"{"id":7,"note":"a \"b\"","k2":"x"}"#);
        let mut key = Vec::new();
        assert!(l.key(&[t("7"), Datum::Null, t("x")], &mut key));
        assert_eq!(key, br#"{"k2":"x","id":7}"#);
        let mut no_key = Vec::new();
        assert!(!l.key(&[t("7"), Datum::Null, Datum::Null], &mut no_key));
        let mut partial = Vec::new();
        l.partial_row(&[t("7"), Datum::Null, t("x")], &mut partial);
        assert_eq!(partial, br#"{"id":7,"note":null,"k2":"x"}"#);
        assert!(Layout::new(vec![("id".into(), Kind::Int)], &["nope".into()]).is_none());
    }

    #[test]
    fn unchanged_toast_values_come_from_the_stored_row() {
        let l = layout();
        let mut row = Vec::new();
        l.row(
            &[t("7"), Datum::Unchanged, t("x")],
            Some(r#"{"id":7,"note":"a long note","k2":"x"}"#),
            &mut row,
        )
        .unwrap();
        assert_eq!(row, br#"{"id":7,"note":"a long note","k2":"x"}"#);
        let e = l
            .row(&[t("7"), Datum::Unchanged, t("x")], None, &mut Vec::new())
            .unwrap_err();
        assert!(e.contains("unchanged TOAST"), "{e}");
        assert!(l.row(&[t("7")], None, &mut Vec::new()).is_err());
    }
}
