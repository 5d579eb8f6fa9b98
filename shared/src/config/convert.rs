//! What every converter shares: the file being read and the issues found so far.

use std::path::Path;

use serde_saphyr::Spanned;

use super::issue::Issue;

pub(super) struct Ctx<'a> {
    pub(super) file: &'a Path,
    pub(super) issues: &'a mut Vec<Issue>,
}

impl Ctx<'_> {
    pub(super) fn at<T>(&mut self, s: &Spanned<T>, msg: impl Into<String>) -> &mut Issue {
        self.issues.push(Issue::new(
            self.file,
            s.referenced.line(),
            s.referenced.column(),
            msg,
        ));
        self.issues.last_mut().expect("just pushed")
    }

    pub(super) fn check<T, U>(
        &mut self,
        s: &Spanned<T>,
        hint: Option<&str>,
        f: impl FnOnce(&T) -> Result<U, String>,
    ) -> Option<U> {
        match f(&s.value) {
            Ok(v) => Some(v),
            Err(msg) => {
                let issue = self.at(s, msg);
                if let Some(h) = hint {
                    issue.hint = Some(h.to_owned());
                }
                None
            }
        }
    }
}

pub(super) fn hint(issue: &mut Issue, h: impl Into<String>) {
    issue.hint = Some(h.into());
}
