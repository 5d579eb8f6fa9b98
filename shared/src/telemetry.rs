//! Logging set-up shared by the binaries: human or JSON format, level from `RUST_LOG` or
//! `-v/-q`, and an optional log file rotated by size (10 MB files, 5 kept, as the original
//! design asks).
//!
//! Libraries only emit events; this module is called once, from a binary's `main`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("log format {s:?} is not `text` or `json`")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogOptions {
    pub format: LogFormat,
    /// -v count minus -q count: 0 = info, 1 = debug, 2+ = trace, -1 = warn, -2 = error.
    pub verbosity: i8,
    pub file: Option<PathBuf>,
    pub max_bytes: u64,
    pub keep: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            format: LogFormat::Text,
            verbosity: 0,
            file: None,
            max_bytes: 10 * 1024 * 1024,
            keep: 5,
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` wins over `-v/-q` when set.
pub fn init(opts: &LogOptions) -> io::Result<()> {
    let level = match opts.verbosity {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{level},hyper=warn,reqwest=warn,rustls=warn,h2=warn"
        ))
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let result = match (&opts.file, opts.format) {
        (Some(path), fmt) => {
            let w = RotatingFile::open(path, opts.max_bytes, opts.keep)?;
            let b = builder.with_ansi(false).with_writer(w);
            match fmt {
                LogFormat::Json => b.json().try_init(),
                LogFormat::Text => b.try_init(),
            }
        }
        (None, LogFormat::Json) => builder.json().with_writer(io::stderr).try_init(),
        (None, LogFormat::Text) => builder.with_writer(io::stderr).try_init(),
    };
    // A second init (tests calling `run` twice) keeps the first subscriber.
    let _ = result;
    Ok(())
}

/// A log file that rotates when it passes `max_bytes`: `f` -> `f.1` -> ... -> `f.<keep>`.
#[derive(Clone)]
pub struct RotatingFile {
    inner: Arc<Mutex<RotState>>,
}

struct RotState {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl RotatingFile {
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<RotatingFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            inner: Arc::new(Mutex::new(RotState {
                path: path.to_owned(),
                file,
                size,
                max_bytes: max_bytes.max(1024),
                keep: keep.max(1),
            })),
        })
    }
}

impl RotState {
    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        let name = |i: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        let _ = std::fs::remove_file(name(self.keep));
        for i in (1..self.keep).rev() {
            let _ = std::fs::rename(name(i), name(i + 1));
        }
        std::fs::rename(&self.path, name(1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if st.size > 0 && st.size + buf.len() as u64 > st.max_bytes {
            st.rotate()?;
        }
        let n = st.file.write(buf)?;
        st.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .file
            .flush()
    }
}

impl<'a> MakeWriter<'a> for RotatingFile {
    type Writer = RotatingFile;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lf.log");
        let mut w = RotatingFile::open(&path, 1024, 3).unwrap();
        let line = [b'x'; 100];
        for _ in 0..100 {
            w.write_all(&line).unwrap();
        }
        assert!(path.exists());
        for i in 1..=3 {
            let p = dir.path().join(format!("lf.log.{i}"));
            assert!(p.exists(), "{p:?}");
            assert!(std::fs::metadata(&p).unwrap().len() <= 1024);
        }
        assert!(!dir.path().join("lf.log.4").exists());
    }
}
