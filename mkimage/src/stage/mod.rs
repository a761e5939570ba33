//! Build stages.
//!
//! Every stage has the same lifecycle: `check` its inputs (cheap, touches nothing),
//! `run` (holding guards for whatever it mounts or attaches), and `cleanup` (always
//! called, also after a failed run). Each stage declares the inputs that define its
//! result; the planner chains them into cache keys. The order of stages is decided
//! in exactly one place: [`crate::plan`].

pub mod assemble;
pub mod bootloader;
pub mod cloud;
pub mod core;
pub mod debootstrap;
pub mod finalize;
pub mod kernel;
pub mod nutshell;
pub mod optimize;
pub mod resize;
pub mod service;
pub mod system;

use crate::recipe::Recipe;
use std::path::{Path, PathBuf};

pub type StageResult = anyhow::Result<()>;

/// State shared by the stages of one build.
pub struct Ctx<'a> {
    pub recipe: &'a Recipe,
    /// The build's private work directory.
    pub work: PathBuf,
    /// The image's root filesystem tree, filled by the content stages.
    pub rootfs: PathBuf,
    /// UUID of the root filesystem (fixed per build; fstab and GRUB name it).
    pub fs_uuid: String,
    /// Where the disk image is being written (a temporary name beside the output).
    pub disk: Option<PathBuf>,
    /// Disk size decided by the resize stage (MiB); the recipe's size otherwise.
    pub disk_size_mib: Option<u64>,
    /// Kernel version installed by the kernel stage (e.g. `6.1.0-28-cloud-amd64`).
    pub kernel_version: Option<String>,
    /// Nutshell builds: the embedded image built earlier in the run (its root tree
    /// for a container, its disk file for a VM).
    pub embedded: Option<PathBuf>,
}

impl Ctx<'_> {
    /// Path inside the image tree.
    pub fn root_path(&self, p: &str) -> PathBuf {
        self.rootfs.join(p.trim_start_matches('/'))
    }

    pub fn write_file(&self, p: &str, content: &str) -> anyhow::Result<()> {
        write_file(&self.rootfs, p, content)
    }
}

/// Writes `content` to `root`/`p`, creating parent directories.
pub fn write_file(root: &Path, p: &str, content: &str) -> anyhow::Result<()> {
    let path = root.join(p.trim_start_matches('/'));
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    // Replace rather than write through: the image may have a symlink here
    // (resolv.conf, hostname) that must never lead outside the tree.
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, content)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// The operations every stage implements.
pub trait StageOps {
    /// Short machine name (`debootstrap`, `kernel`, …); also the test fail-point name.
    fn name(&self) -> String;
    /// One line for `plan` and the progress display.
    fn describe(&self) -> String;
    /// The inputs that define this stage's result (they go into its cache key).
    fn inputs(&self) -> serde_json::Value;
    /// Whether the rootfs after this stage is kept in the cache.
    fn cacheable(&self) -> bool {
        false
    }
    /// Validates inputs and host prerequisites without changing anything.
    fn check(&self, _ctx: &Ctx) -> StageResult {
        Ok(())
    }
    fn run(&self, ctx: &mut Ctx) -> StageResult;
    /// Called after `run`, whether it succeeded or not.
    fn cleanup(&self, _ctx: &mut Ctx) {}
}

/// The stages, as one closed set of types.
pub enum Stage {
    Debootstrap(debootstrap::Debootstrap),
    System(system::System),
    Kernel(kernel::Kernel),
    Core(core::Core),
    Service(service::Service),
    Optimize(optimize::Optimize),
    Resize(resize::Resize),
    Cloud(cloud::Cloud),
    Finalize(finalize::Finalize),
    Bootloader(bootloader::Bootloader),
    Assemble(assemble::Assemble),
    Nutshell(nutshell::Nutshell),
}

impl Stage {
    pub fn ops(&self) -> &dyn StageOps {
        match self {
            Stage::Debootstrap(s) => s,
            Stage::System(s) => s,
            Stage::Kernel(s) => s,
            Stage::Core(s) => s,
            Stage::Service(s) => s,
            Stage::Optimize(s) => s,
            Stage::Resize(s) => s,
            Stage::Cloud(s) => s,
            Stage::Finalize(s) => s,
            Stage::Bootloader(s) => s,
            Stage::Assemble(s) => s,
            Stage::Nutshell(s) => s,
        }
    }
}

/// Test-only fault injection: `MKIMAGE_TEST_FAIL_STAGE=<stage name>` makes that stage
/// fail at its fail point — placed where it holds the most host resources — so tests
/// can prove that a failure anywhere leaves nothing behind.
///
/// `MKIMAGE_TEST_PAUSE_STAGE=<stage name>` makes the stage stop at the same point for
/// two seconds, holding what it holds, after printing `mkimage-test: paused in
/// <stage>`: the fault-sweep test sends its signals around that window.
pub fn fail_point(stage: &str) -> StageResult {
    if std::env::var("MKIMAGE_TEST_PAUSE_STAGE").is_ok_and(|s| s == stage) {
        eprintln!("mkimage-test: paused in {stage}");
        for _ in 0..40 {
            crate::host::signals::check()?;
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    match std::env::var("MKIMAGE_TEST_FAIL_STAGE") {
        Ok(s) if s == stage => {
            anyhow::bail!("injected failure in stage `{stage}` (MKIMAGE_TEST_FAIL_STAGE)")
        }
        _ => Ok(()),
    }
}
