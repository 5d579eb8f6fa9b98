//! `Issue` (one located problem) and `ConfigError` (every problem found in one pass).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// One problem in a configuration file, located to line and column (1-based).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Issue {
    pub file: PathBuf,
    pub line: u64,
    pub col: u64,
    pub message: String,
    pub hint: Option<String>,
}

impl Issue {
    pub fn new(file: &Path, line: u64, col: u64, message: impl Into<String>) -> Issue {
        Issue {
            file: file.to_owned(),
            line: line.max(1),
            col: col.max(1),
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Issue {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

/// Every problem found in the configuration, sorted by file, line and column.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub issues: Vec<Issue>,
}

impl ConfigError {
    pub fn new(mut issues: Vec<Issue>) -> ConfigError {
        issues.sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
        issues.dedup();
        ConfigError { issues }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

/// The closest of `candidates` to `word`, when it is close enough to be a likely typo.
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_for_typos() {
        let keys = ["password", "password_env", "host", "user"];
        assert_eq!(did_you_mean("pasword", &keys), Some("password"));
        assert_eq!(did_you_mean("hots", &keys), Some("host"));
        assert_eq!(did_you_mean("zzzzzz", &keys), None);
    }

    #[test]
    fn display_is_path_line_col_then_hint() {
        let i = Issue::new(Path::new("data/users.yml"), 3, 5, "bad").with_hint("fix it");
        assert_eq!(i.to_string(), "data/users.yml:3:5: bad\n  hint: fix it");
    }
}
