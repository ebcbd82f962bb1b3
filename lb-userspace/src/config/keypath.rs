//! Locating TOML errors: the key path of a deserialization error (from
//! `serde_path_to_error`), or the line and column of a syntax error.

use std::path::Path;

use serde::de::DeserializeOwned;

use super::ConfigError;

/// Deserializes `text`, naming the key path (e.g.
/// `service[0].backends[1].colour`) of the key or value an error is about.
/// Syntax errors, which have no path, are named `<toml>:line:column`.
pub(super) fn from_str<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let path = e.path();
        let err = e.inner();
        let key = if path.iter().next().is_some() {
            path.to_string()
        } else {
            match err.span() {
                None => "<toml>".to_owned(),
                Some(span) => {
                    let (line, column) = line_column(text, span.start);
                    format!("<toml>:{line}:{column}")
                }
            }
        };
        ConfigError::invalid(file, key, err.message().trim())
    })
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
