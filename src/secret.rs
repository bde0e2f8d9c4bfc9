//! Secrets (cluster account passwords): loaded from an environment variable or a file,
//! never printed. `Debug` and `Display` show `[redacted]`.

use std::fmt;
use std::path::Path;

/// A secret string. The only way to read it is [`Secret::expose`], which makes every use
/// easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("set exactly one of password_env or password_file")]
    NoSource,
    #[error("set only one of password_env or password_file, not both")]
    TwoSources,
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("environment variable {0} is empty")]
    EnvEmpty(String),
    #[error("cannot read password_file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("password_file {0} is empty")]
    FileEmpty(String),
}

/// Loads a secret from exactly one of an environment variable or a file (relative paths are
/// taken from `base`). A trailing newline in the file is not part of the secret.
pub fn load(env: Option<&str>, file: Option<&Path>, base: &Path) -> Result<Secret, SecretError> {
    match (env, file) {
        (None, None) => Err(SecretError::NoSource),
        (Some(_), Some(_)) => Err(SecretError::TwoSources),
        (Some(var), None) => match std::env::var(var) {
            Ok(v) if v.is_empty() => Err(SecretError::EnvEmpty(var.into())),
            Ok(v) => Ok(Secret(v)),
            Err(_) => Err(SecretError::EnvMissing(var.into())),
        },
        (None, Some(path)) => {
            let full = base.join(path);
            let text = std::fs::read_to_string(&full).map_err(|source| SecretError::File {
                path: full.display().to_string(),
                source,
            })?;
            let value = text.trim_end_matches(['\n', '\r']);
            if value.is_empty() {
                return Err(SecretError::FileEmpty(full.display().to_string()));
            }
            Ok(Secret(value.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_secret_drops_trailing_newline_and_never_prints() {
        let dir = std::env::temp_dir().join(format!("chgate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "hunter2\n").unwrap();
        let s = load(None, Some(Path::new("pw")), &dir).unwrap();
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        std::fs::write(dir.join("empty"), "\n").unwrap();
        assert!(matches!(
            load(None, Some(Path::new("empty")), &dir),
            Err(SecretError::FileEmpty(_))
        ));
        assert!(matches!(
            load(None, Some(Path::new("missing")), &dir),
            Err(SecretError::File { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn exactly_one_source() {
        assert!(matches!(
            load(None, None, Path::new(".")),
            Err(SecretError::NoSource)
        ));
        assert!(matches!(
            load(Some("X"), Some(Path::new("y")), Path::new(".")),
            Err(SecretError::TwoSources)
        ));
    }
}
