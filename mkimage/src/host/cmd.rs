//! Running host commands: logged, interruptible, with the tail of stderr kept for
//! error messages.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many stderr lines an error message carries.
const STDERR_TAIL: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot start `{command}`: {source}{}", hint(.program))]
    Spawn {
        command: String,
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}){}", tail(.stderr_tail))]
    Failed {
        command: String,
        status: String,
        stderr_tail: Vec<String>,
    },
    #[error("`{command}` was stopped: interrupted by signal {signal}")]
    Interrupted { command: String, signal: i32 },
}

fn hint(program: &str) -> String {
    match crate::host::fsutil::package_for_tool(program) {
        Some(pkg) => format!(" (install the Debian package `{pkg}`)"),
        None => String::new(),
    }
}

fn tail(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last lines of its output:\n    {}", lines.join("\n    "))
    }
}

/// A command to run on the host.
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            cwd: None,
            stdin: None,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Cmd {
        self.envs
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Cmd {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// Bytes fed to the command's standard input.
    pub fn stdin_bytes(mut self, data: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(data.into());
        self
    }

    /// The command line as a user would type it (for logs and errors).
    pub fn display(&self) -> String {
        let mut s = self.program.to_string_lossy().into_owned();
        for a in &self.args {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
            } else {
                s.push(' ');
                s.push_str(&a);
            }
        }
        s
    }

    /// Runs the command; its output goes to the log. Fails on a non-zero exit.
    pub fn run(self) -> Result<(), CmdError> {
        self.run_capture().map(|_| ())
    }

    /// Runs the command and returns its standard output.
    pub fn output(self) -> Result<String, CmdError> {
        self.run_capture()
    }

    fn run_capture(self) -> Result<String, CmdError> {
        let command = self.display();
        tracing::debug!(target: "mkimage::cmd", "$ {command}");
        let mut c = Command::new(&self.program);
        c.args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            // Own process group: a terminal Ctrl-C reaches only us, and we decide how
            // the child is stopped (and wait for it) before guards unwind.
            .process_group(0);
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        // Marks the command (and whatever it starts) as this build's, for `mkimage gc`.
        if let Some(id) = crate::journal::active_id() {
            c.env(crate::journal::ENV_MARKER, id);
        }
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        let mut child = c.spawn().map_err(|source| CmdError::Spawn {
            command: command.clone(),
            program: self.program.to_string_lossy().into_owned(),
            source,
        })?;
        // Journaled right after the spawn (its pid is not known before): if we die in
        // between, gc still finds the group by the environment marker.
        let ticket = crate::journal::acquire(crate::journal::Resource::ProcessGroup {
            pgid: child.id() as i32,
            start_time: crate::journal::process_start_time(child.id() as i32).unwrap_or(0),
            program: self.program.to_string_lossy().into_owned(),
        });
        let _release = ReleaseOnDrop(ticket);
        if let Some(data) = self.stdin {
            let mut stdin = child.stdin.take().expect("piped stdin");
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&data);
            });
        }
        let tail_buf = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let stderr = child.stderr.take().expect("piped stderr");
        let tb = tail_buf.clone();
        let err_thread = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                tracing::debug!(target: "mkimage::cmd", "  {line}");
                let mut t = tb.lock().unwrap();
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        let mut stdout = child.stdout.take().expect("piped stdout");
        let out_thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stdout.read_to_end(&mut buf);
            buf
        });
        let status = loop {
            if let Some(st) = child.try_wait().map_err(|source| CmdError::Spawn {
                command: command.clone(),
                program: self.program.to_string_lossy().into_owned(),
                source,
            })? {
                break st;
            }
            if crate::host::signals::interrupted() {
                stop_process_group(child.id() as i32);
                let _ = child.wait();
                let _ = err_thread.join();
                let _ = out_thread.join();
                return Err(CmdError::Interrupted {
                    command,
                    signal: crate::host::signals::signal().unwrap_or(2),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = err_thread.join();
        let out = out_thread.join().unwrap_or_default();
        let out = String::from_utf8_lossy(&out).into_owned();
        for line in out.lines().take(200) {
            tracing::trace!(target: "mkimage::cmd", "  | {line}");
        }
        if status.success() {
            Ok(out)
        } else {
            let mut stderr_tail: Vec<String> = tail_buf.lock().unwrap().iter().cloned().collect();
            if stderr_tail.is_empty() {
                stderr_tail = out
                    .lines()
                    .rev()
                    .take(STDERR_TAIL)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
            }
            Err(CmdError::Failed {
                command,
                status: describe(status),
                stderr_tail,
            })
        }
    }
}

/// Releases a journal ticket when the command has been waited for, on every path.
struct ReleaseOnDrop(Option<crate::journal::Ticket>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        crate::journal::release(self.0.take());
    }
}

fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => st.to_string(),
    }
}

/// Asks a process group to stop (SIGTERM), then kills it after a grace period.
pub fn stop_process_group(pgid: i32) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let pg = Pid::from_raw(pgid);
    if killpg(pg, Signal::SIGTERM).is_err() {
        return;
    }
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        if killpg(pg, None).is_err() {
            return;
        }
    }
    let _ = killpg(pg, Signal::SIGKILL);
}
