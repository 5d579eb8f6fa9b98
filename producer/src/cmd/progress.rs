//! Progress bars for the long waits (`submit --wait`, `status --watch`, `teardown --wait`),
//! drawn on stderr with indicatif. Shown only to a person: never with `--json`, and never
//! when stdout or stderr is not a terminal (a pipe, a file, CI, a container's log), where
//! the callers print their plain progress lines instead.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar, or nothing when output is not for a person.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar over `unit` (e.g. "VMs"); `None` inside when `json` or not on a terminal.
    pub fn new(json: bool, unit: &str) -> Progress {
        if !shown(json) {
            return Progress(None);
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:30.cyan/blue}} {{pos}}/{{len}} {unit} {{msg}}"
        ))
        .expect("the template is valid")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress(Some(bar))
    }

    /// Whether a bar is drawn (callers print plain lines when not).
    pub fn is_shown(&self) -> bool {
        self.0.is_some()
    }

    /// `finished` of `total` done, with a short status message.
    pub fn update(&self, finished: u64, total: u64, msg: impl Into<String>) {
        if let Some(b) = &self.0 {
            b.set_length(total);
            b.set_position(finished.min(total));
            b.set_message(msg.into());
        }
    }

    /// Removes the bar so the final report starts on a clean line.
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Bars are for people: not with `--json`, and only when both stdout and stderr are terminals.
pub fn shown(json: bool) -> bool {
    !json && std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}
