//! Logging: concise lines on the terminal, everything (including the output of
//! every command) in the build log file once a build has chosen one.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static LOG_FILE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Writer that goes to the current build log, or nowhere.
#[derive(Clone, Copy)]
pub struct BuildLog;

impl Write for BuildLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = LOG_FILE.lock().unwrap().as_mut() {
            f.write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(f) = LOG_FILE.lock().unwrap().as_mut() {
            f.flush()?;
        }
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BuildLog {
    type Writer = BuildLog;
    fn make_writer(&'a self) -> Self::Writer {
        BuildLog
    }
}

/// Sets up the subscriber. `verbosity` 0 = info on the terminal, 1 = debug, 2+ = trace.
pub fn init(verbosity: u8) {
    let term_level = match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let term = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_filter(EnvFilter::try_from_env("MKIMAGE_LOG").unwrap_or_else(|_| {
            EnvFilter::new(format!(
                "{term_level},mkimage::cmd={}",
                if verbosity >= 1 { term_level } else { "warn" }
            ))
        }));
    let file = tracing_subscriber::fmt::layer()
        .with_writer(BuildLog)
        .with_ansi(false)
        .with_filter(EnvFilter::new("trace"));
    let _ = tracing_subscriber::registry()
        .with(term)
        .with(file)
        .try_init();
}

/// Starts writing the build log to `path` (truncating it).
pub fn open_build_log(path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    *LOG_FILE.lock().unwrap() = Some(f);
    Ok(())
}

pub fn close_build_log() {
    if let Some(mut f) = LOG_FILE.lock().unwrap().take() {
        let _ = f.flush();
    }
}
