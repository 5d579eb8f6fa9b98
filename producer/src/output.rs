//! Where command output goes: stdout for results, stderr for problems. Kept behind one
//! type so `--json` output stays a single JSON document on stdout.

use std::io::Write;

#[derive(Default)]
pub struct Out;

impl Out {
    pub fn line(&mut self, s: impl AsRef<str>) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{}", s.as_ref());
    }

    pub fn err_line(&mut self, s: impl AsRef<str>) {
        let mut e = std::io::stderr().lock();
        let _ = writeln!(e, "{}", s.as_ref());
    }

    pub fn json(&mut self, v: &serde_json::Value) {
        self.line(serde_json::to_string_pretty(v).expect("JSON values serialize"));
    }
}
