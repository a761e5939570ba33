//! A server process of the harness: own process group, log file, readiness poll, and a
//! Drop that kills the whole group (gunicorn's workers may outlive their master).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process in its own process group, its stdout and stderr in a log file.
/// Drop kills the group: SIGTERM, up to 5 s for the leader, then SIGKILL.
pub struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts `cmd` as `name` in a new process group, output to `log`; panics when it
    /// cannot be started.
    pub fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Server {
        let out = fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Server { name, child, log }
    }

    /// The name given at [`Server::spawn`], used in messages.
    pub fn name(&self) -> &str {
        self.name
    }

    /// The process id of the leader, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file (stdout and stderr).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Polls `url` until it answers 2xx or 300; panics with the end of the log when the
    /// process exits or `timeout` is up.
    pub async fn wait_http(&mut self, url: &str, timeout: Duration) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("HTTP client");
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited ({st}) before it was ready; log {}:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log)
                );
            }
            if let Ok(r) = http.get(url).send().await {
                if r.status().is_success() || r.status().as_u16() == 300 {
                    return;
                }
            }
            assert!(
                start.elapsed() < timeout,
                "{} not ready at {url} after {timeout:?}; log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let pgid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pgid, Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Workers of the group may outlive the leader: always finish the group.
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The last 40 lines of a log file, for failure messages.
fn log_tail(path: &Path) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
