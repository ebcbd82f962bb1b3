//! Locating TOML errors: a `toml::de::Error` turned into a [`ConfigError`]
//! whose key is the path of the offending key.

use std::path::Path;

use serde::{
    Deserialize,
    de::{self, MapAccess, SeqAccess, Visitor},
};
use toml::Spanned;

use super::ConfigError;

// ---------------------------------------------------------------------------
// toml errors -> key paths.
//
// toml::de::Error carries a message and a byte span but not the key path, so
// on error the text is parsed a second time into a tree of key and
// array-element spans, and the key path is the innermost one at the error's
// position. Syntax errors (no tree) fall back to `<toml>:line:column`.
// ---------------------------------------------------------------------------

pub(super) fn toml_error(text: &str, file: &Path, err: &toml::de::Error) -> ConfigError {
    let key = match err.span() {
        None => "<toml>".to_owned(),
        Some(span) => key_at(text, span.start).unwrap_or_else(|| {
            let (line, column) = line_column(text, span.start);
            format!("<toml>:{line}:{column}")
        }),
    };
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key,
        reason: err.message().trim().to_owned(),
    }
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The key path of the key or value that starts at, or most closely before,
/// byte `offset`.
///
/// Serde errors point at a key (unknown field) or at the start of a value
/// (type, variant); a value starts right after its key's `=` or is an array
/// element, so the last marker at or before the offset is the one it belongs
/// to. Table-level errors may point at the `[` of a `[table]` header, which
/// precedes the table's own key; those are moved onto the header's key.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let root: SpanNode = toml::from_str(text).ok()?;
    let mut markers = Vec::new();
    collect_markers(&root, "", &mut markers);

    let offset = if markers.iter().any(|(start, _)| *start == offset) {
        offset
    } else {
        skip_header_brackets(text, offset)
    };
    markers
        .iter()
        .filter(|(start, _)| *start <= offset)
        // The latest start wins. Markers are pushed parent first, and
        // max_by_key keeps the last maximum, so a (hypothetical) tie goes to
        // the deeper path.
        .max_by_key(|(start, _)| *start)
        .map(|(_, path)| path.clone())
}

/// If `offset` is at a line-initial `[`/`[[` header, the offset of the
/// header's first key; otherwise `offset` unchanged.
fn skip_header_brackets(text: &str, offset: usize) -> usize {
    let Some((before, rest)) = text.split_at_checked(offset) else {
        return offset;
    };
    let line_so_far = before.rsplit('\n').next().unwrap_or(before);
    if !rest.starts_with('[') || !line_so_far.trim().is_empty() {
        return offset;
    }
    let skipped = rest.len() - rest.trim_start_matches(['[', ' ', '\t']).len();
    offset + skipped
}

fn collect_markers(node: &SpanNode, path: &str, out: &mut Vec<(usize, String)>) {
    match node {
        SpanNode::Leaf => {}
        SpanNode::Table(entries) => {
            for (key, value) in entries {
                let child = if path.is_empty() {
                    key.get_ref().clone()
                } else {
                    format!("{path}.{}", key.get_ref())
                };
                out.push((key.span().start, child.clone()));
                collect_markers(value, &child, out);
            }
        }
        SpanNode::Array(elements) => {
            for (i, element) in elements.iter().enumerate() {
                let child = format!("{path}[{i}]");
                out.push((element.span().start, child.clone()));
                collect_markers(element.get_ref(), &child, out);
            }
        }
    }
}

/// Any TOML document, keeping only structure and spans. Table values are
/// not `Spanned` because implicit tables (from dotted keys or `[a.b]`
/// headers) have no span; keys and array elements always do.
enum SpanNode {
    Leaf,
    Table(Vec<(Spanned<String>, SpanNode)>),
    Array(Vec<Spanned<SpanNode>>),
}

impl<'de> Deserialize<'de> for SpanNode {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SpanNodeVisitor)
    }
}

struct SpanNodeVisitor;

impl<'de> Visitor<'de> for SpanNodeVisitor {
    type Value = SpanNode;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<SpanNode, E> {
        Ok(SpanNode::Leaf)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<SpanNode, E> {
        Ok(SpanNode::Leaf)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<SpanNode, E> {
        Ok(SpanNode::Leaf)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<SpanNode, E> {
        Ok(SpanNode::Leaf)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<SpanNode, E> {
        Ok(SpanNode::Leaf)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SpanNode, A::Error> {
        let mut elements = Vec::new();
        while let Some(element) = seq.next_element()? {
            elements.push(element);
        }
        Ok(SpanNode::Array(elements))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SpanNode, A::Error> {
        let mut entries = Vec::new();
        loop {
            // A datetime value is handed to visitors as a one-entry map whose
            // key has no span; it is a leaf, not a table.
            let key: Spanned<String> = match map.next_key() {
                Ok(Some(key)) => key,
                Ok(None) => break,
                Err(_) => return Ok(SpanNode::Leaf),
            };
            entries.push((key, map.next_value()?));
        }
        Ok(SpanNode::Table(entries))
    }
}
