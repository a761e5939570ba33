//! Shared helpers for the end-to-end tests: finding the built binaries, running
//! them, and checking that the host was left clean.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn fixture(rel: &str) -> PathBuf {
    workspace().join("fixtures").join(rel)
}

/// A binary of the workspace, built by the same `cargo test` run (target/<profile>/NAME).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let p = profile_dir.join(name);
    assert!(
        p.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (it builds every binary first)",
        p.display()
    );
    p
}

pub fn mkimage() -> Command {
    Command::new(bin("mkimage"))
}

/// Heavy tests (debootstrap, qemu) run one at a time: the machine has two cores and
/// the cleanliness checks look at global state (mount table, loop devices).
pub fn heavy() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    eprintln!(
        "--- {:?} exited {:?}\n--- stdout:\n{}--- stderr:\n{}",
        cmd,
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

/// Loop devices whose backing file lies below `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["-a", "-n", "-O", "NAME,BACK-FILE"])
        .output()
        .unwrap();
    let dir = dir.to_string_lossy().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&dir))
        .map(str::to_owned)
        .collect()
}

/// Asserts nothing of a build under `root` is mounted or attached.
pub fn assert_clean(root: &Path) {
    assert_eq!(
        mounts_under(root),
        Vec::<String>::new(),
        "mounts left under {}",
        root.display()
    );
    assert_eq!(
        loops_under(root),
        Vec::<String>::new(),
        "loop devices left for {}",
        root.display()
    );
}

/// Files in a directory, by name.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A test sandbox: state dir (work trees) and output dir under one temp dir; the
/// stage cache is the machine's shared one, so the debootstrap base is reused.
pub struct Sandbox {
    dir: Option<tempfile::TempDir>,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let base = std::env::var_os("MKIMAGE_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/var/tmp".into());
        std::fs::create_dir_all(&base).unwrap();
        Sandbox {
            dir: Some(
                tempfile::Builder::new()
                    .prefix("mkimage-e2e-")
                    .tempdir_in(base)
                    .unwrap(),
            ),
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
    pub fn state(&self) -> PathBuf {
        self.path().join("state")
    }
    pub fn out(&self) -> PathBuf {
        self.path().join("out")
    }
    /// `mkimage build` with this sandbox's state and output dirs.
    pub fn build(&self) -> Command {
        let mut c = mkimage();
        c.arg("build")
            .arg("-o")
            .arg(self.out())
            .env("MKIMAGE_STATE_DIR", self.state());
        c
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Never delete recursively through a mount (a bind of the host's /dev would
        // take the host's device nodes with it): keep the directory instead.
        if let Some(d) = self.dir.take() {
            if !mounts_under(d.path()).is_empty() {
                eprintln!(
                    "leaving {} in place: something is still mounted below it",
                    d.path().display()
                );
                let _ = d.keep();
            }
        }
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox::new()
    }
}
