//! From a file or text to a [`Validated`] config.

use std::path::Path;

use super::validate::{self, Problem, Validated};
use super::Config;

/// Reads, parses and validates the config at `path`; relative paths inside it are resolved
/// against the file's directory.
pub fn load(path: &Path) -> Result<Validated, Vec<Problem>> {
    let (config, base) = read::<Config>(path)?;
    validate::validate(config, &base)
}

/// Reads and parses a TOML file into `T` (a syntax or type error with its line and column),
/// with the directory its relative paths are taken from.
pub fn read<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<(T, std::path::PathBuf), Vec<Problem>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![Problem::new("", format!("cannot read the file: {e}"))])?;
    let base = path
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .to_path_buf();
    let parsed = toml::from_str(&text).map_err(|e| vec![Problem::from_toml(&e, &text)])?;
    Ok((parsed, base))
}

/// Parses and validates config text; `base` is the directory relative paths are taken from.
pub fn parse(text: &str, base: &Path) -> Result<Validated, Vec<Problem>> {
    let config: Config = toml::from_str(text).map_err(|e| vec![Problem::from_toml(&e, text)])?;
    validate::validate(config, base)
}

/// Checks a file as `chgate config check` does: a whole config, or a bootstrap file (with
/// `[config_source]`) on its own, whose clusters and users come from ZooKeeper.
pub fn check(path: &Path) -> Result<Validated, Vec<Problem>> {
    let (config, base) = read::<Config>(path)?;
    let bootstrap = config.config_source.is_some();
    validate::validate_with(config, &base, !bootstrap)
}
