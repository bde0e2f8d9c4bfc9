//! ClickHouse column types as RowBinary encoders need them, parsed from the type names
//! `system.columns` reports (`Nullable(DateTime('UTC'))`, `Array(UInt32)`, ...).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnType {
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Int8,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Bool,
    String,
    FixedString(usize),
    Date,
    DateTime,
    /// Ticks of 10^-precision seconds.
    DateTime64(u32),
    /// A fixed-point number: `precision` digits of which `scale` after the point, stored as
    /// the integer `value * 10^scale` in 4, 8, 16 or 32 bytes (by precision).
    Decimal {
        precision: u32,
        scale: u32,
    },
    Uuid,
    Nullable(Box<ColumnType>),
    Array(Box<ColumnType>),
    /// Encoded as its inner type in RowBinary.
    LowCardinality(Box<ColumnType>),
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::FixedString(n) => write!(f, "FixedString({n})"),
            Self::DateTime64(p) => write!(f, "DateTime64({p})"),
            Self::Decimal { precision, scale } => write!(f, "Decimal({precision}, {scale})"),
            Self::Uuid => write!(f, "UUID"),
            Self::Nullable(t) => write!(f, "Nullable({t})"),
            Self::Array(t) => write!(f, "Array({t})"),
            Self::LowCardinality(t) => write!(f, "LowCardinality({t})"),
            other => write!(f, "{other:?}"),
        }
    }
}

impl ColumnType {
    /// Parses a ClickHouse type name. Time zones are accepted and ignored (values are
    /// stored as UTC instants, which is what ClickHouse stores).
    pub fn parse(name: &str) -> Result<Self, String> {
        let name = name.trim();
        let (head, arg) = match name.find('(') {
            Some(open) if name.ends_with(')') => {
                (&name[..open], Some(&name[open + 1..name.len() - 1]))
            }
            Some(_) => return Err(format!("unbalanced parentheses in type {name:?}")),
            None => (name, None),
        };
        let inner = |arg: Option<&str>| -> Result<Box<ColumnType>, String> {
            match arg {
                Some(a) => Ok(Box::new(Self::parse(a)?)),
                None => Err(format!("{head} needs a type argument")),
            }
        };
        Ok(match (head, arg) {
            ("UInt8", None) => Self::UInt8,
            ("UInt16", None) => Self::UInt16,
            ("UInt32", None) => Self::UInt32,
            ("UInt64", None) => Self::UInt64,
            ("Int8", None) => Self::Int8,
            ("Int16", None) => Self::Int16,
            ("Int32", None) => Self::Int32,
            ("Int64", None) => Self::Int64,
            ("Float32", None) => Self::Float32,
            ("Float64", None) => Self::Float64,
            ("Bool", None) => Self::Bool,
            ("String", None) => Self::String,
            ("FixedString", Some(n)) => Self::FixedString(
                n.trim()
                    .parse()
                    .map_err(|_| format!("FixedString length {n:?} is not a number"))?,
            ),
            ("Date", None) => Self::Date,
            ("DateTime", _) => Self::DateTime,
            ("DateTime64", Some(args)) => {
                let precision = args.split(',').next().unwrap_or("").trim();
                let p: u32 = precision
                    .parse()
                    .map_err(|_| format!("DateTime64 precision {precision:?} is not a number"))?;
                if p > 9 {
                    return Err(format!("DateTime64 precision {p} is above 9"));
                }
                Self::DateTime64(p)
            }
            ("Decimal", Some(args)) => {
                let (p, s) = args
                    .split_once(',')
                    .ok_or_else(|| format!("Decimal({args}) needs a precision and a scale"))?;
                decimal(number(p)?, number(s)?)?
            }
            ("Decimal32", Some(s)) => decimal(9, number(s)?)?,
            ("Decimal64", Some(s)) => decimal(18, number(s)?)?,
            ("Decimal128", Some(s)) => decimal(38, number(s)?)?,
            ("Decimal256", Some(s)) => decimal(76, number(s)?)?,
            ("UUID", None) => Self::Uuid,
            ("Nullable", a) => Self::Nullable(inner(a)?),
            ("Array", a) => Self::Array(inner(a)?),
            ("LowCardinality", a) => Self::LowCardinality(inner(a)?),
            _ => return Err(format!("type {name} is not supported by chgate ingest")),
        })
    }

    /// The bytes a `Decimal` of `precision` digits takes in RowBinary.
    pub fn decimal_bytes(precision: u32) -> usize {
        match precision {
            0..=9 => 4,
            10..=18 => 8,
            19..=38 => 16,
            _ => 32,
        }
    }
}

fn number(s: &str) -> Result<u32, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{:?} is not a number", s.trim()))
}

fn decimal(precision: u32, scale: u32) -> Result<ColumnType, String> {
    if !(1..=76).contains(&precision) || scale > precision {
        return Err(format!(
            "Decimal({precision}, {scale}) needs 1 <= precision <= 76 and scale <= precision"
        ));
    }
    Ok(ColumnType::Decimal { precision, scale })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_system_columns_reports() {
        assert_eq!(ColumnType::parse("UInt64"), Ok(ColumnType::UInt64));
        assert_eq!(
            ColumnType::parse("DateTime('Europe/Berlin')"),
            Ok(ColumnType::DateTime)
        );
        assert_eq!(
            ColumnType::parse("Nullable(DateTime64(3, 'UTC'))"),
            Ok(ColumnType::Nullable(Box::new(ColumnType::DateTime64(3))))
        );
        assert_eq!(
            ColumnType::parse("Array(LowCardinality(String))"),
            Ok(ColumnType::Array(Box::new(ColumnType::LowCardinality(
                Box::new(ColumnType::String)
            ))))
        );
        assert_eq!(
            ColumnType::parse("FixedString(16)"),
            Ok(ColumnType::FixedString(16))
        );
        assert_eq!(
            ColumnType::parse("Nullable(Decimal(12, 2))"),
            Ok(ColumnType::Nullable(Box::new(ColumnType::Decimal {
                precision: 12,
                scale: 2
            })))
        );
        assert_eq!(
            ColumnType::parse("Decimal64(4)"),
            Ok(ColumnType::Decimal {
                precision: 18,
                scale: 4
            })
        );
        assert_eq!(
            ColumnType::parse("Array(UUID)").unwrap().to_string(),
            "Array(UUID)"
        );
        assert!(ColumnType::parse("Decimal(3, 4)").is_err());
        assert!(ColumnType::parse("Decimal(77, 0)").is_err());
        assert!(ColumnType::parse("Enum8('a' = 1)")
            .unwrap_err()
            .contains("not supported"));
        assert!(ColumnType::parse("Array(").is_err());
        assert!(ColumnType::parse("Nullable").is_err());
    }
}
