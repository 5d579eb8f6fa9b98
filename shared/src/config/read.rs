//! Reading a configuration file safely: a size cap before parsing, UTF-8 and binary checks,
//! and serde-saphyr's budgets (depth, nodes, aliases), so hostile input gives a clear error
//! instead of a panic, a hang or an out-of-memory abort.

use std::io::Read;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::issue::{Issue, did_you_mean};

/// Largest configuration file accepted (a 3,000-student users.yml is ~60 KB).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Whether messages about this file may quote its text. connections.yml holds secrets, so
/// errors about it never echo a value or a source snippet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Quoting {
    Allowed,
    SecretsInside,
}

/// Reads `path` into a string, refusing files that are too large, binary or not UTF-8.
pub fn read_text(path: &Path) -> Result<String, Issue> {
    let file = std::fs::File::open(path).map_err(|e| {
        Issue::new(path, 1, 1, format!("cannot read file: {e}")).with_hint(
            "check the path, or pass --data-dir DIR (or --connections/--deployment/--users FILE)",
        )
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Issue::new(path, 1, 1, format!("cannot read file: {e}")))?;
    text_from_bytes(path, bytes)
}

pub fn text_from_bytes(path: &Path, bytes: Vec<u8>) -> Result<String, Issue> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Issue::new(
            path,
            1,
            1,
            format!(
                "file is larger than {} KiB; refusing to parse it",
                MAX_FILE_BYTES / 1024
            ),
        )
        .with_hint(
            "a labfleet configuration file is a few KiB; check that this is the right file",
        ));
    }
    if let Some(pos) = bytes.iter().position(|b| *b == 0) {
        let (line, col) = line_col(&bytes[..pos]);
        return Err(Issue::new(
            path,
            line,
            col,
            "file contains a NUL byte: this looks like a binary file, not YAML",
        )
        .with_hint("point labfleet at the YAML file itself"));
    }
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let (line, col) = line_col(&e.as_bytes()[..valid]);
            Err(Issue::new(path, line, col, "file is not valid UTF-8")
                .with_hint("save the file as UTF-8 text"))
        }
    }
}

fn line_col(prefix: &[u8]) -> (u64, u64) {
    let line = prefix.iter().filter(|b| **b == b'\n').count() as u64 + 1;
    let col = match prefix.iter().rposition(|b| *b == b'\n') {
        Some(nl) => prefix.len() - nl,
        None => prefix.len() + 1,
    } as u64;
    (line, col)
}

/// Parses YAML text into `T` (a raw struct). Returns one located issue on the first syntax
/// or type error, with a "did you mean" hint for unknown keys.
pub fn parse_yaml<T: DeserializeOwned>(
    path: &Path,
    text: &str,
    quoting: Quoting,
    what: &str,
) -> Result<T, Issue> {
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(
            Issue::new(path, 1, 1, format!("file is empty: expected {what}"))
                .with_hint("see data/README.md for an annotated example"),
        );
    }
    serde_saphyr::from_str::<T>(text).map_err(|err| issue_from_saphyr(path, &err, quoting))
}

fn issue_from_saphyr(path: &Path, err: &serde_saphyr::Error, quoting: Quoting) -> Issue {
    use serde_saphyr::Error as E;
    let inner = err.without_snippet();
    let (line, col) = inner
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    match inner {
        E::SerdeUnknownField {
            field, expected, ..
        } => {
            let mut issue = Issue::new(path, line, col, format!("unknown key `{field}`"));
            issue = match did_you_mean(field, expected) {
                Some(s) => issue.with_hint(format!("did you mean `{s}`?")),
                None => issue.with_hint(format!("valid keys here: {}", expected.join(", "))),
            };
            issue
        }
        E::DuplicateMappingKey { key, .. } => {
            // Keys are names (clusters, fields), not secret values, so quoting them is safe.
            let what = key
                .as_deref()
                .map(|k| format!(" `{k}`"))
                .unwrap_or_default();
            Issue::new(path, line, col, format!("duplicate key{what}"))
                .with_hint("a key may appear only once per mapping; merge or rename the entries")
        }
        E::SerdeMissingField { field, .. } => {
            Issue::new(path, line, col, format!("missing key `{field}`"))
                .with_hint("see data/README.md for the keys each entry needs")
        }
        other => {
            let text = first_line(&other.to_string());
            let budget = text.contains("budget") || text.contains("recursion limit");
            let hint = if budget {
                "the file is nested too deeply or expands too many aliases; write it out plainly"
            } else {
                "check the YAML syntax and the value's type at this position"
            };
            let message = match quoting {
                Quoting::Allowed => text,
                // A type or syntax error message may quote the offending value, which in this
                // file may be a password: describe the class of error only.
                Quoting::SecretsInside if budget => {
                    "file exceeds the parser's nesting or alias limits".to_owned()
                }
                Quoting::SecretsInside => {
                    "syntax or type error here (the text is not shown: this file holds secrets)"
                        .to_owned()
                }
            };
            Issue::new(path, line, col, message).with_hint(hint)
        }
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    // serde-saphyr prefixes some messages with their location; ours comes from `location()`.
    line.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col(b""), (1, 1));
        assert_eq!(line_col(b"ab"), (1, 3));
        assert_eq!(line_col(b"ab\ncd"), (2, 3));
    }

    #[test]
    fn binary_and_oversized_input_is_refused() {
        let p = Path::new("x.yml");
        assert!(
            text_from_bytes(p, vec![0x7f, b'E', b'L', b'F', 0, 1])
                .unwrap_err()
                .message
                .contains("binary")
        );
        assert!(
            text_from_bytes(p, vec![b'a', 0xff])
                .unwrap_err()
                .message
                .contains("UTF-8")
        );
        let big = vec![b'#'; (MAX_FILE_BYTES + 1) as usize];
        assert!(
            text_from_bytes(p, big)
                .unwrap_err()
                .message
                .contains("larger than")
        );
    }
}
