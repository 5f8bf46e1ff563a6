//! Where in a file a value is: a path of keys and indexes resolved against
//! toml's spanned document, turned into line and column.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// One step of a path into a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(&'static str),
    Index(usize),
}

/// The span of the deepest value the path reaches: the value itself when it
/// exists, the enclosing table (its `[header]`) or array entry when a key is
/// missing, and the start of the document when not even the first key is
/// there — where toml itself reports a missing top-level field. None only
/// when the text does not parse.
pub fn span_of(text: &str, path: &[Seg]) -> Option<Range<usize>> {
    let doc = DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut span = Some(0..0);
    let mut value: Option<&DeValue<'_>> = None;
    for seg in path {
        let next = match (seg, value) {
            (Seg::Key(k), None) => table.get(*k),
            (Seg::Key(k), Some(DeValue::Table(t))) => {
                table = t;
                table.get(*k)
            }
            (Seg::Index(i), Some(DeValue::Array(a))) => a.get(*i),
            _ => None,
        };
        match next {
            Some(v) => {
                span = Some(v.span());
                value = Some(v.get_ref());
            }
            None => break,
        }
    }
    span
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}
