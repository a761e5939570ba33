//! The crash journal: what a running command holds on the host, written down
//! *before* it is acquired, so that whatever a dead build left behind (after
//! SIGKILL, an OOM kill or a power loss) can be found and released by `mkimage gc`.
//!
//! One journal file per running build under `STATE_DIR/journal/`, appended to
//! line by line (JSON). Guards call [`acquire`] before taking a resource and
//! [`release`] after giving it back; the file is removed when the command ends
//! with nothing outstanding. Guard code needs no journal handle: the journal of
//! the running command is process-wide, and without one the calls do nothing
//! (library use, unit tests).
//!
//! A journal whose owner is gone (its pid is dead, or reused by another program:
//! the start time differs) is *stale*. [`collect`] releases its outstanding
//! resources in reverse order: processes first (so nothing keeps a mount busy),
//! then mounts, loop devices, partial files and directories.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Environment variable set on every command a journaled build starts: processes
/// that outlive a killed build (and their descendants) are found by it.
pub const ENV_MARKER: &str = "MKIMAGE_JOURNAL";

/// Something a build holds on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    /// A directory the build created and removes at the end.
    Dir { path: PathBuf },
    /// A file written under a temporary name, renamed into place on success.
    Partial { path: PathBuf },
    /// A mount point (bind or filesystem).
    Mount { target: PathBuf },
    /// A loop device attached to `backing` (its number is only known after attach).
    Loop { backing: PathBuf, offset: u64 },
    /// A process group started by the build (`pgid` = the leader's pid).
    ProcessGroup {
        pgid: i32,
        start_time: u64,
        program: String,
    },
    /// A single process (QEMU) started by the build.
    Process {
        pid: i32,
        start_time: u64,
        program: String,
    },
    /// Something a registration creates in a cloud (found again by its build-id tag).
    Cloud {
        // Nested, not flattened: the resource has a `kind` field of its own.
        resource: register::journal::CloudResource,
    },
}

impl Resource {
    fn describe(&self) -> String {
        match self {
            Resource::Dir { path } => format!("directory {}", path.display()),
            Resource::Partial { path } => format!("partial file {}", path.display()),
            Resource::Mount { target } => format!("mount on {}", target.display()),
            Resource::Loop { backing, offset } => {
                format!("loop device on {} (offset {offset})", backing.display())
            }
            Resource::ProcessGroup { pgid, program, .. } => {
                format!("process group {pgid} ({program})")
            }
            Resource::Process { pid, program, .. } => format!("process {pid} ({program})"),
            Resource::Cloud { resource } => format!("cloud resource: {}", resource.describe()),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    Begin {
        id: String,
        pid: i32,
        start_time: u64,
        command: String,
        started: String,
    },
    Acquire {
        n: u64,
        #[serde(flatten)]
        resource: Resource,
    },
    Release {
        n: u64,
    },
}

struct Active {
    id: String,
    path: PathBuf,
    file: File,
    outstanding: BTreeMap<u64, Resource>,
}

static ACTIVE: Mutex<Option<Active>> = Mutex::new(None);
static NEXT: AtomicU64 = AtomicU64::new(1);

/// Ticket for one journaled resource; hand it back to [`release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

/// The journal of the running command; closed (and removed when nothing is
/// outstanding) on drop.
pub struct JournalGuard {
    _private: (),
}

/// Starts this process's journal under `state_dir/journal/`.
pub fn begin(state_dir: &Path, id: &str, command: &str) -> std::io::Result<JournalGuard> {
    let dir = journal_dir(state_dir);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{id}.journal"));
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)?;
    let pid = std::process::id() as i32;
    let rec = Record::Begin {
        id: id.to_owned(),
        pid,
        start_time: process_start_time(pid).unwrap_or(0),
        command: command.to_owned(),
        started: crate::build::now_rfc3339(),
    };
    write_record(&mut file, &rec)?;
    *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Active {
        id: id.to_owned(),
        path,
        file,
        outstanding: BTreeMap::new(),
    });
    Ok(JournalGuard { _private: () })
}

impl Drop for JournalGuard {
    fn drop(&mut self) {
        let mut g = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = g.take() {
            if a.outstanding.is_empty() {
                let _ = std::fs::remove_file(&a.path);
            } else {
                tracing::warn!(
                    "{} resource(s) could not be released; `mkimage gc` will retry: {}",
                    a.outstanding.len(),
                    a.outstanding
                        .values()
                        .map(Resource::describe)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
    }
}

/// The id of the running command's journal, if any (for [`ENV_MARKER`]).
pub fn active_id() -> Option<String> {
    ACTIVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|a| a.id.clone())
}

/// Records that `resource` is about to be acquired. Durable before it returns
/// (fdatasync), so a crash right after the acquisition still finds it.
pub fn acquire(resource: Resource) -> Option<Ticket> {
    let mut g = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
    let a = g.as_mut()?;
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let rec = Record::Acquire {
        n,
        resource: resource.clone(),
    };
    if let Err(e) = write_record(&mut a.file, &rec).and_then(|_| a.file.sync_data()) {
        tracing::warn!("crash journal {}: {e}", a.path.display());
    }
    a.outstanding.insert(n, resource);
    Some(Ticket(n))
}

/// Forwards the registration library's cloud resources into this journal.
pub struct CloudHook;

impl register::journal::ResourceHook for CloudHook {
    fn acquire(&self, r: &register::journal::CloudResource) -> Option<u64> {
        acquire(Resource::Cloud {
            resource: r.clone(),
        })
        .map(|Ticket(n)| n)
    }
    fn release(&self, ticket: Option<u64>) {
        release(ticket.map(Ticket));
    }
}

/// Records that a resource was given back.
pub fn release(ticket: Option<Ticket>) {
    let Some(Ticket(n)) = ticket else { return };
    let mut g = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = g.as_mut() {
        a.outstanding.remove(&n);
        // No sync: losing a release record only makes gc re-check a resource,
        // and every release step of gc tolerates "already gone".
        let _ = write_record(&mut a.file, &Record::Release { n });
    }
}

fn write_record(file: &mut File, rec: &Record) -> std::io::Result<()> {
    let mut line = serde_json::to_string(rec).map_err(std::io::Error::other)?;
    line.push('\n');
    file.write_all(line.as_bytes())
}

pub fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journal")
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat):
/// with the pid it names a process uniquely, even after pid reuse.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn alive(pid: i32, start_time: u64) -> bool {
    pid > 0 && process_start_time(pid).is_some_and(|t| start_time == 0 || t == start_time)
}

/// A journal left on disk, parsed.
#[derive(Debug)]
pub struct JournalFile {
    pub path: PathBuf,
    pub id: String,
    pub pid: i32,
    pub command: String,
    pub started: String,
    /// True when its owner is gone.
    pub stale: bool,
    /// Acquired and not released, in acquisition order.
    pub outstanding: Vec<Resource>,
}

fn read_journal(path: &Path) -> std::io::Result<JournalFile> {
    let f = File::open(path)?;
    let mut j = JournalFile {
        path: path.to_owned(),
        id: String::new(),
        pid: 0,
        command: String::new(),
        started: String::new(),
        stale: true,
        outstanding: Vec::new(),
    };
    let mut start_time = 0;
    let mut open: BTreeMap<u64, Resource> = BTreeMap::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        // A crash can cut the last line short: ignore what does not parse.
        let Ok(rec) = serde_json::from_str::<Record>(&line) else {
            continue;
        };
        match rec {
            Record::Begin {
                id,
                pid,
                start_time: t,
                command,
                started,
            } => {
                j.id = id;
                j.pid = pid;
                start_time = t;
                j.command = command;
                j.started = started;
            }
            Record::Acquire { n, resource } => {
                open.insert(n, resource);
            }
            Record::Release { n } => {
                open.remove(&n);
            }
        }
    }
    j.stale = !alive(j.pid, start_time);
    j.outstanding = open.into_values().collect();
    Ok(j)
}

/// Every journal under `state_dir`, live and stale.
pub fn list(state_dir: &Path) -> Vec<JournalFile> {
    let Ok(rd) = std::fs::read_dir(journal_dir(state_dir)) else {
        return Vec::new();
    };
    let mut v: Vec<JournalFile> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "journal"))
        .filter_map(|p| read_journal(&p).ok())
        .collect();
    v.sort_by(|a, b| a.started.cmp(&b.started));
    v
}

/// Stale journals (what `mkimage build` warns about at start).
pub fn stale(state_dir: &Path) -> Vec<JournalFile> {
    list(state_dir).into_iter().filter(|j| j.stale).collect()
}

/// What `gc` did with one resource.
#[derive(Debug, Clone, Serialize)]
pub struct GcAction {
    pub journal: String,
    pub resource: String,
    pub outcome: String,
    pub ok: bool,
}

/// Releases what dead builds left behind. With `dry_run`, only reports.
pub fn collect(state_dir: &Path, dry_run: bool) -> Vec<GcAction> {
    let mut actions = Vec::new();
    for j in stale(state_dir) {
        let mut all_ok = true;
        let mut act = |resource: String, r: std::io::Result<String>| {
            let (outcome, ok) = match r {
                Ok(s) => (s, true),
                Err(e) => (format!("FAILED: {e}"), false),
            };
            all_ok &= ok;
            actions.push(GcAction {
                journal: j.id.clone(),
                resource,
                outcome,
                ok,
            });
        };
        // 1. Processes: the journaled groups, then anything that still carries the
        //    build's marker (descendants that left the group).
        for r in j.outstanding.iter().rev() {
            match r {
                Resource::ProcessGroup {
                    pgid, start_time, ..
                } => act(r.describe(), kill_group(*pgid, *start_time, dry_run)),
                Resource::Process {
                    pid, start_time, ..
                } => act(r.describe(), kill_one(*pid, *start_time, dry_run)),
                _ => {}
            }
        }
        for pid in marked_processes(&j.id) {
            act(
                format!("process {pid} ({})", comm(pid)),
                kill_one(pid, 0, dry_run),
            );
        }
        // Cloud resources (credentials from the environment, as `register` takes them).
        let clouds: Vec<&register::journal::CloudResource> = j
            .outstanding
            .iter()
            .rev()
            .filter_map(|r| match r {
                Resource::Cloud { resource } => Some(resource),
                _ => None,
            })
            .collect();
        if !clouds.is_empty() {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    for c in clouds {
                        let r = rt
                            .block_on(register::journal::release(c, dry_run))
                            .map_err(std::io::Error::other);
                        act(format!("cloud resource: {}", c.describe()), r);
                    }
                }
                Err(e) => act("cloud resources".into(), Err(e)),
            }
        }
        // 2. Mounts (deepest first), including anything mounted below a journaled
        //    directory that was not journaled itself (e.g. by a killed child).
        let mut targets: Vec<PathBuf> = Vec::new();
        for r in j.outstanding.iter().rev() {
            match r {
                Resource::Mount { target } => targets.push(target.clone()),
                Resource::Dir { path } => {
                    targets.extend(crate::host::fsutil::mounts_under(path));
                }
                _ => {}
            }
        }
        targets.sort_by(|a, b| {
            (std::cmp::Reverse(a.components().count()), a)
                .cmp(&(std::cmp::Reverse(b.components().count()), b))
        });
        targets.dedup();
        for t in targets {
            act(format!("mount on {}", t.display()), unmount(&t, dry_run));
        }
        // 3. Loop devices, partial files, directories.
        for r in j.outstanding.iter().rev() {
            match r {
                Resource::Loop { backing, offset } => {
                    act(r.describe(), detach_loops(backing, *offset, dry_run))
                }
                Resource::Partial { path } => act(r.describe(), remove_file(path, dry_run)),
                Resource::Dir { path } => act(r.describe(), remove_dir(path, dry_run)),
                _ => {}
            }
        }
        if !dry_run && all_ok {
            let _ = std::fs::remove_file(&j.path);
        }
        if j.outstanding.is_empty() && actions.iter().all(|a| a.journal != j.id) {
            actions.push(GcAction {
                journal: j.id.clone(),
                resource: "journal".into(),
                outcome: if dry_run {
                    "nothing outstanding; would remove the journal".into()
                } else {
                    "nothing outstanding; journal removed".into()
                },
                ok: true,
            });
        }
    }
    actions
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// Pids of processes whose environment carries `MKIMAGE_JOURNAL=<id>`.
pub fn marked_processes(id: &str) -> Vec<i32> {
    let needle = format!("{ENV_MARKER}={id}");
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

fn kill_group(pgid: i32, start_time: u64, dry_run: bool) -> std::io::Result<String> {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let pg = Pid::from_raw(pgid);
    if killpg(pg, None).is_err() {
        return Ok("already gone".into());
    }
    // The leader may be dead while members live; if the leader lives, it must be ours.
    if process_start_time(pgid).is_some() && !alive(pgid, start_time) {
        return Ok("pid reused by another program; left alone".into());
    }
    if dry_run {
        return Ok("would kill".into());
    }
    killpg(pg, Signal::SIGKILL).map_err(std::io::Error::from)?;
    wait_gone(|| killpg(pg, None).is_err());
    Ok("killed".into())
}

fn kill_one(pid: i32, start_time: u64, dry_run: bool) -> std::io::Result<String> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if !alive(pid, start_time) {
        return Ok("already gone".into());
    }
    if dry_run {
        return Ok("would kill".into());
    }
    kill(Pid::from_raw(pid), Signal::SIGKILL).map_err(std::io::Error::from)?;
    wait_gone(|| !alive(pid, start_time) || is_zombie(pid));
    Ok("killed".into())
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.get(s.rfind(')')? + 2..).map(|r| r.starts_with('Z')))
        .unwrap_or(true)
}

fn wait_gone(gone: impl Fn() -> bool) {
    for _ in 0..100 {
        if gone() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn is_mounted(target: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let t = target.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| crate::host::fsutil::unescape_mountinfo(m) == t)
}

fn unmount(target: &Path, dry_run: bool) -> std::io::Result<String> {
    if !is_mounted(target) {
        return Ok("not mounted".into());
    }
    if dry_run {
        return Ok("would unmount".into());
    }
    crate::host::mount::unmount(target)?;
    Ok("unmounted".into())
}

/// Loop devices whose backing file (and offset) match.
pub fn loops_backed_by(backing: &Path, offset: Option<u64>) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let want = backing.to_string_lossy().into_owned();
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            let dir = e.path().join("loop");
            let file = std::fs::read_to_string(dir.join("backing_file")).unwrap_or_default();
            let file = file.trim();
            // The kernel appends " (deleted)" when the backing file is gone.
            let same = file == want || file.strip_suffix(" (deleted)") == Some(want.as_str());
            let off_ok = offset.is_none_or(|o| {
                std::fs::read_to_string(dir.join("offset"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    == Some(o)
            });
            same && off_ok
        })
        .map(|e| PathBuf::from("/dev").join(e.file_name()))
        .collect()
}

fn detach_loops(backing: &Path, offset: u64, dry_run: bool) -> std::io::Result<String> {
    let devs = loops_backed_by(backing, Some(offset));
    if devs.is_empty() {
        return Ok("not attached".into());
    }
    let names = devs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if dry_run {
        return Ok(format!("would detach {names}"));
    }
    for d in &devs {
        crate::host::Cmd::new("losetup")
            .arg("-d")
            .arg(d)
            .run()
            .map_err(std::io::Error::other)?;
    }
    Ok(format!("detached {names}"))
}

fn remove_file(path: &Path, dry_run: bool) -> std::io::Result<String> {
    if !path.exists() {
        return Ok("not there".into());
    }
    if dry_run {
        return Ok("would remove".into());
    }
    std::fs::remove_file(path)?;
    Ok("removed".into())
}

fn remove_dir(path: &Path, dry_run: bool) -> std::io::Result<String> {
    if !path.exists() {
        return Ok("not there".into());
    }
    if dry_run {
        return Ok("would remove".into());
    }
    crate::host::fsutil::remove_tree(path).map_err(std::io::Error::other)?;
    Ok("removed".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_stable_and_names_this_process() {
        let me = std::process::id() as i32;
        let a = process_start_time(me).unwrap();
        assert_eq!(process_start_time(me), Some(a));
        assert!(alive(me, a));
        assert!(!alive(me, a + 1));
    }

    #[test]
    fn records_round_trip_and_a_torn_last_line_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.journal");
        let mut f = File::create(&path).unwrap();
        write_record(
            &mut f,
            &Record::Begin {
                id: "x".into(),
                // pid 0 is never a live process: the journal is stale.
                pid: 0,
                start_time: 1,
                command: "build".into(),
                started: "2026-01-01T00:00:00Z".into(),
            },
        )
        .unwrap();
        for (n, p) in [(1, "/a"), (2, "/b")] {
            write_record(
                &mut f,
                &Record::Acquire {
                    n,
                    resource: Resource::Dir { path: p.into() },
                },
            )
            .unwrap();
        }
        write_record(&mut f, &Record::Release { n: 1 }).unwrap();
        f.write_all(b"{\"op\":\"acq").unwrap();
        drop(f);
        let j = read_journal(&path).unwrap();
        assert!(j.stale);
        assert_eq!(j.id, "x");
        assert_eq!(j.outstanding, vec![Resource::Dir { path: "/b".into() }]);
    }

    #[test]
    fn gc_removes_what_a_dead_build_left_and_keeps_a_live_journal() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path();
        std::fs::create_dir_all(journal_dir(state)).unwrap();
        let left = d.path().join("work-left");
        std::fs::create_dir_all(left.join("sub")).unwrap();
        let partial = d.path().join(".img.partial-1");
        std::fs::write(&partial, b"half").unwrap();
        let mut f = File::create(journal_dir(state).join("dead.journal")).unwrap();
        write_record(
            &mut f,
            &Record::Begin {
                id: "dead".into(),
                pid: 0,
                start_time: 1,
                command: "build".into(),
                started: "2026-01-01T00:00:00Z".into(),
            },
        )
        .unwrap();
        for (n, r) in [
            (1, Resource::Dir { path: left.clone() }),
            (
                2,
                Resource::Partial {
                    path: partial.clone(),
                },
            ),
        ] {
            write_record(&mut f, &Record::Acquire { n, resource: r }).unwrap();
        }
        drop(f);
        // A live journal (this process) is never touched.
        let me = std::process::id() as i32;
        let mut f = File::create(journal_dir(state).join("live.journal")).unwrap();
        write_record(
            &mut f,
            &Record::Begin {
                id: "live".into(),
                pid: me,
                start_time: process_start_time(me).unwrap(),
                command: "build".into(),
                started: "2026-01-01T00:00:01Z".into(),
            },
        )
        .unwrap();
        drop(f);

        let dry = collect(state, true);
        assert!(dry.iter().any(|a| a.outcome == "would remove"));
        assert!(left.exists() && partial.exists());

        let done = collect(state, false);
        assert!(done.iter().all(|a| a.ok), "{done:?}");
        assert!(done.iter().all(|a| a.journal == "dead"));
        assert!(!left.exists());
        assert!(!partial.exists());
        assert!(!journal_dir(state).join("dead.journal").exists());
        assert!(journal_dir(state).join("live.journal").exists());
        assert!(collect(state, false).is_empty());
    }
}
