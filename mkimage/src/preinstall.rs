//! `mkimage preinstall IMAGE APP_DIR`: puts an application (and the Debian packages
//! it needs) into an existing services image, so nodes need not install it at boot.
//!
//! This automates the manual procedure of the ConPaaS documentation (check the
//! digest, grow, `losetup`, `e2fsck`, `resize2fs`, mount, copy, chroot with /dev,
//! /dev/pts and /proc, `apt-get`, clean up), for raw and qcow2 images, partitioned
//! (MBR or GPT) or a bare ext2/3/4 filesystem.
//!
//! Steps:
//! 1. check the arguments, read the image format (`qemu-img info`), and verify the
//!    input against `--md5`/`--sha256`/`--manifest`, else the manifest or
//!    MD5SUMS/SHA256SUMS beside it; with none of those it refuses unless
//!    `--no-verify`. Nothing is written before this passes.
//! 2. make a working copy: raw input is copied (reflink, else sparse) to a temporary
//!    name beside the output; other formats are converted to a raw temporary.
//! 3. find the root filesystem: the whole file if it is one, else the ext partition
//!    labelled `root`, else the largest Linux one.
//! 4. `--grow`: extend the file, the last partition's entry (only when the root
//!    partition is last) and the filesystem (`e2fsck -fy`, `resize2fs`).
//! 5. attach the root filesystem as its own loop device (offset + size limit) and
//!    mount it in a private work directory.
//! 6. copy APP_DIR to `--dest` (default [`DEFAULT_DEST`]).
//! 7. `--packages` (`apt-get update`, `install --no-install-recommends`, `clean`, lists
//!    removed) and `--run SCRIPT` (copied to the image's /tmp, run from `--dest`,
//!    removed) inside a [`ChrootSession`].
//! 8. unmount, detach, convert back when the input was not raw, hash, rename into
//!    place, write `<out>.manifest.json` and MD5SUMS/SHA256SUMS beside the output.
//!
//! Safety rules:
//! - transactional: the input is only read; the output appears (by rename) only
//!   when every step succeeded; on any error, panic or Ctrl-C the guards unmount,
//!   detach and delete the temporaries, in reverse order.
//! - nothing is ever written through a symlink in the image: writes go through
//!   directory descriptors opened component by component with `O_NOFOLLOW`, and the
//!   directories the chroot setup writes to must be real directories.
//! - APP_DIR is read without following its symlinks. A symlink is copied as a
//!   symlink only when it resolves inside `--dest` in the image; any other symlink
//!   (absolute, `..` escaping, through another link) and any special file is
//!   skipped with a warning and listed in the report and the manifest.
//! - copied files keep their permission bits (not setuid/setgid/sticky) and times
//!   and are owned by root.
//! - test hook: `MKIMAGE_TEST_FAIL_PREINSTALL=<point>` (or
//!   [`PreinstallArgs::fail_at`]) fails on purpose at `after-workcopy`,
//!   `after-mount`, `after-copy`, `after-packages`, `after-chroot` or
//!   `after-unmount`.

mod copy;

pub use copy::{link_stays_inside, CopyStats, ImageDir, Skipped};

use crate::disk::{self, Layout};
use crate::host::fsutil::{self, PendingFile};
use crate::host::{signals, ChrootSession, Cmd, LoopDevice, MountGuard};
use crate::manifest::{Artefact, Manifest, StageRecord};
use crate::verify::{self, Digests, Expected, VerifyError};
use indicatif::ProgressBar;
use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

/// Where the application goes in the image unless `--dest` says otherwise.
pub const DEFAULT_DEST: &str = "/opt/app";

/// Environment variable of the test-only fault injection hook.
pub const FAIL_ENV: &str = "MKIMAGE_TEST_FAIL_PREINSTALL";

/// Largest `--run` script accepted.
const MAX_SCRIPT: u64 = 16 << 20;

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:\n  \
sudo mkimage preinstall conpaas.img ./myapp --md5 28299ac49cc216dde57b107000078c4f\n  \
sudo mkimage preinstall out/conpaas.img ./myapp --packages python3-flask,jq --run setup.sh\n  \
sudo mkimage preinstall conpaas.qcow2 ./myapp --grow +1G --dest /srv/myapp -o custom.qcow2\n  \
sudo mkimage preinstall rpi-rootfs.img ./myapp --no-verify\n\n\
The input is never modified. The result is written as OUT (default IMAGE-STEM-preinstalled.EXT \
beside the input) with OUT.manifest.json and MD5SUMS/SHA256SUMS entries, only when every step \
succeeded; on failure or Ctrl-C nothing stays mounted or attached and no output appears.\n\
Symlinks in APP_DIR are copied only when they resolve inside --dest; others are skipped with a warning.\n\
Exit codes: 1 digest mismatch or failed step, 2 bad input, 130 interrupted.")]
pub struct PreinstallArgs {
    /// The services image: raw or qcow2, partitioned (MBR/GPT) or a bare ext2/3/4 filesystem.
    pub image: PathBuf,
    /// Directory whose contents are copied to --dest in the image.
    pub app_dir: PathBuf,
    /// Expected MD5 of IMAGE (as published with the ConPaaS images).
    #[arg(long, value_name = "HEX", conflicts_with_all = ["manifest", "no_verify"])]
    pub md5: Option<String>,
    /// Expected SHA-256 of IMAGE.
    #[arg(long, value_name = "HEX", conflicts_with_all = ["manifest", "no_verify"])]
    pub sha256: Option<String>,
    /// Check IMAGE against a manifest: `--manifest` for IMAGE.manifest.json, `--manifest=PATH` for another.
    #[arg(
        long,
        value_name = "PATH",
        num_args = 0..=1,
        require_equals = true,
        conflicts_with = "no_verify"
    )]
    pub manifest: Option<Option<PathBuf>>,
    /// Proceed without any digest check (when none is given or found beside IMAGE).
    #[arg(long)]
    pub no_verify: bool,
    /// Grow the image: `+512M` adds, `3G` sets the total size (units K, M, G, T; MiB if none).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = false)]
    pub grow: Option<String>,
    /// Debian packages to install in the image (comma separated, repeatable).
    #[arg(long, value_name = "PKG,...", value_delimiter = ',')]
    pub packages: Vec<String>,
    /// Host script copied into the image and run there (as root, in a chroot, from --dest), then removed.
    #[arg(long = "run", value_name = "SCRIPT")]
    pub run_script: Option<PathBuf>,
    /// Absolute directory in the image that receives APP_DIR's contents.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DEST)]
    pub dest: PathBuf,
    /// Output image (default: IMAGE-STEM-preinstalled.EXT beside IMAGE).
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Show progress bars on stderr (only when it is a terminal).
    #[arg(skip = true)]
    pub progress: bool,
    /// Test-only fault injection point (overrides MKIMAGE_TEST_FAIL_PREINSTALL).
    #[arg(skip)]
    pub fail_at: Option<String>,
}

impl PreinstallArgs {
    /// Arguments with every option at its default (for library callers and tests).
    pub fn new(image: &Path, app_dir: &Path) -> PreinstallArgs {
        PreinstallArgs {
            image: image.to_owned(),
            app_dir: app_dir.to_owned(),
            md5: None,
            sha256: None,
            manifest: None,
            no_verify: false,
            grow: None,
            packages: vec![],
            run_script: None,
            dest: PathBuf::from(DEFAULT_DEST),
            output: None,
            progress: false,
            fail_at: None,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PreinstallReport {
    pub output: PathBuf,
    pub manifest: PathBuf,
    /// `raw`, `qcow2`.
    pub format: String,
    /// Where the root filesystem was found.
    pub layout: String,
    /// Input digests, when they were checked.
    pub input_md5: Option<String>,
    pub input_sha256: Option<String>,
    pub md5: String,
    pub sha256: String,
    pub size: u64,
    /// Bytes added by `--grow`.
    pub grown_by: u64,
    /// Root filesystem size before and after, in bytes.
    pub fs_bytes_before: u64,
    pub fs_bytes_after: u64,
    pub copy: CopyStats,
    pub packages_requested: Vec<String>,
    pub script: Option<String>,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PreinstallError {
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Verify(VerifyError),
    #[error("{step}: {source:#}")]
    Step {
        step: &'static str,
        source: anyhow::Error,
    },
    #[error("preinstall interrupted by signal {0}; nothing was left mounted or attached and no output was written")]
    Interrupted(i32),
}

impl PreinstallError {
    /// 1 = digest mismatch or failed step, 2 = bad input, 130 = interrupted.
    pub fn exit_code(&self) -> u8 {
        match self {
            PreinstallError::BadInput(_) => 2,
            PreinstallError::Verify(VerifyError::Mismatch { .. }) => 1,
            PreinstallError::Verify(_) => 2,
            PreinstallError::Step { .. } => 1,
            PreinstallError::Interrupted(_) => 130,
        }
    }
}

fn bad(msg: impl Into<String>) -> PreinstallError {
    PreinstallError::BadInput(msg.into())
}

/// Error mapper for a step: an interruption wins over whatever failed because of it.
fn step<E: Into<anyhow::Error>>(name: &'static str) -> impl Fn(E) -> PreinstallError {
    move |e| {
        if signals::interrupted() {
            PreinstallError::Interrupted(signals::signal().unwrap_or(2))
        } else {
            PreinstallError::Step {
                step: name,
                source: e.into(),
            }
        }
    }
}

fn checkpoint(fail_at: Option<&str>, point: &'static str) -> Result<(), PreinstallError> {
    if let Err(e) = signals::check() {
        return Err(PreinstallError::Interrupted(e.0));
    }
    if fail_at == Some(point) {
        return Err(PreinstallError::Step {
            step: point,
            source: anyhow::anyhow!("injected failure ({FAIL_ENV}={point})"),
        });
    }
    Ok(())
}

/// Validated inputs.
struct Checked {
    image: PathBuf,
    app_dir: PathBuf,
    dest: PathBuf,
    output: PathBuf,
    packages: Vec<String>,
    script: Option<(String, Vec<u8>)>,
    grow: Option<Grow>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grow {
    By(u64),
    To(u64),
}

fn parse_grow(s: &str) -> Result<Grow, String> {
    match s.trim().strip_prefix('+') {
        Some(rest) => disk::parse_size(rest).map(Grow::By),
        None => disk::parse_size(s).map(Grow::To),
    }
}

/// A Debian package name, optionally with `=version` or `/release`.
fn valid_package(p: &str) -> bool {
    let (name, rest) = match p.find(['=', '/']) {
        Some(i) => (&p[..i], Some(&p[i + 1..])),
        None => (p, None),
    };
    let name_ok = name.len() >= 2
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.:".contains(&b));
    let rest_ok = match rest {
        None => true,
        Some(r) => {
            !r.is_empty()
                && r.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.~:_".contains(&b))
        }
    };
    name_ok && rest_ok
}

/// `--dest` must be absolute, plain (no `.`/`..`), and not the root or a virtual
/// filesystem.
fn check_dest(dest: &Path) -> Result<PathBuf, String> {
    if !dest.is_absolute() {
        return Err(format!(
            "--dest {} must be an absolute path",
            dest.display()
        ));
    }
    let mut out = PathBuf::from("/");
    for c in dest.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            _ => {
                return Err(format!(
                    "--dest {} must not contain `.` or `..`",
                    dest.display()
                ))
            }
        }
    }
    let first = out.components().nth(1).map(|c| c.as_os_str().to_owned());
    match first.as_deref().and_then(OsStr::to_str) {
        None => Err("--dest must not be the image's root directory".into()),
        Some("proc" | "sys" | "dev" | "run") => Err(format!(
            "--dest {} is on a virtual filesystem of the running system",
            out.display()
        )),
        _ => Ok(out),
    }
}

fn default_output(image: &Path) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let name = match image.extension() {
        Some(ext) => format!("{stem}-preinstalled.{}", ext.to_string_lossy()),
        None => format!("{stem}-preinstalled"),
    };
    image.with_file_name(name)
}

fn check_args(args: &PreinstallArgs) -> Result<Checked, PreinstallError> {
    let md = std::fs::metadata(&args.image)
        .map_err(|e| bad(format!("cannot read image {}: {e}", args.image.display())))?;
    if !md.is_file() {
        return Err(bad(format!("{} is not a file", args.image.display())));
    }
    let image = args
        .image
        .canonicalize()
        .map_err(|e| bad(format!("{}: {e}", args.image.display())))?;
    let app_dir = args.app_dir.canonicalize().map_err(|e| {
        bad(format!(
            "cannot read APP_DIR {}: {e}",
            args.app_dir.display()
        ))
    })?;
    if !app_dir.is_dir() {
        return Err(bad(format!(
            "APP_DIR {} is not a directory",
            app_dir.display()
        )));
    }
    let dest = check_dest(&args.dest).map_err(bad)?;
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&image));
    let out_dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let out_dir = out_dir.canonicalize().map_err(|e| {
        bad(format!(
            "output directory {} is not usable: {e}",
            out_dir.display()
        ))
    })?;
    let out_name = output
        .file_name()
        .ok_or_else(|| bad(format!("output {} has no file name", output.display())))?;
    let output = out_dir.join(out_name);
    if output == image {
        return Err(bad(
            "the output must not be the input image (the input is never modified)",
        ));
    }
    if let Ok(a) = std::fs::metadata(&output) {
        use std::os::unix::fs::MetadataExt;
        if a.ino() == md.ino() && a.dev() == md.dev() {
            return Err(bad("the output is the same file as the input image"));
        }
    }
    let mut packages = Vec::new();
    for p in &args.packages {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        if !valid_package(p) {
            return Err(bad(format!("`{p}` is not a Debian package name")));
        }
        packages.push(p.to_owned());
    }
    let script = match &args.run_script {
        None => None,
        Some(s) => {
            let smd = std::fs::metadata(s)
                .map_err(|e| bad(format!("cannot read --run {}: {e}", s.display())))?;
            if !smd.is_file() || smd.len() > MAX_SCRIPT {
                return Err(bad(format!(
                    "--run {} must be a regular file of at most 16 MiB",
                    s.display()
                )));
            }
            let body = std::fs::read(s)
                .map_err(|e| bad(format!("cannot read --run {}: {e}", s.display())))?;
            let name = s
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "script".into());
            Some((name, body))
        }
    };
    let grow = args
        .grow
        .as_deref()
        .map(parse_grow)
        .transpose()
        .map_err(|e| bad(format!("--grow: {e}")))?;
    Ok(Checked {
        image,
        app_dir,
        dest,
        output,
        packages,
        script,
        grow,
    })
}

fn expectation(args: &PreinstallArgs, image: &Path) -> Result<Option<Expected>, PreinstallError> {
    if args.no_verify {
        return Ok(None);
    }
    if args.md5.is_some() || args.sha256.is_some() {
        for (flag, v, len) in [("--md5", &args.md5, 32), ("--sha256", &args.sha256, 64)] {
            if let Some(v) = v {
                if v.len() != len || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(format!("{flag} wants {len} hex digits, got `{v}`")));
                }
            }
        }
        return Ok(Some(Expected {
            md5: args.md5.clone(),
            sha256: args.sha256.clone(),
            source: "command line".into(),
        }));
    }
    let e = match &args.manifest {
        Some(m) => {
            let path = m.clone().unwrap_or_else(|| Manifest::path_for(image));
            Expected::from_manifest(&path, image).map_err(|e| bad(format!("{e:#}")))?
        }
        None => Expected::beside(image),
    };
    if e.md5.is_none() && e.sha256.is_none() {
        return Err(bad(format!(
            "no expected digest for {}: give --md5/--sha256/--manifest, keep the manifest or \
             MD5SUMS/SHA256SUMS beside it, or pass --no-verify",
            image.display()
        )));
    }
    Ok(Some(e))
}

fn bar(enabled: bool, len: Option<u64>, msg: String) -> ProgressBar {
    match len {
        Some(n) => crate::progress::bytes(enabled, n, msg),
        None => crate::progress::spinner(enabled, msg),
    }
}

/// The private work directory (raw temporary, mount point); removed on drop, never
/// through a mount.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fsutil::remove_tree(&self.0) {
            tracing::error!("could not remove {}: {e}", self.0.display());
        }
    }
}

/// Copies `src` to `dst`: a reflink when the filesystem can, else a sparse copy.
fn copy_image(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let reflink = Cmd::new("cp")
        .args(["--reflink=always", "--"])
        .arg(src)
        .arg(dst)
        .run();
    if reflink.is_ok() {
        tracing::debug!("reflinked {} to {}", src.display(), dst.display());
        return Ok(());
    }
    signals::check()?;
    let _ = std::fs::remove_file(dst);
    Cmd::new("cp")
        .args(["--sparse=always", "--"])
        .arg(src)
        .arg(dst)
        .run()?;
    Ok(())
}

/// The directories the chroot setup writes into; each must be a real directory (or
/// missing) so nothing is bind-mounted or written through a symlink to the host.
const CHROOT_DIRS: &[&str] = &[
    "dev", "dev/pts", "proc", "sys", "etc", "usr", "usr/sbin", "tmp",
];

fn check_chroot_dirs(root: &ImageDir) -> anyhow::Result<()> {
    for d in CHROOT_DIRS {
        match root.open_path(Path::new(d), false) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("unsafe image for a chroot: {e}"),
        }
    }
    // The chroot setup writes policy-rc.d by path when it is missing; a dangling
    // symlink there would be followed on the host.
    if let Ok(sbin) = root.open_path(Path::new("usr/sbin"), false) {
        if sbin.is_symlink(OsStr::new("policy-rc.d"))? {
            anyhow::bail!(
                "unsafe image for a chroot: /usr/sbin/policy-rc.d is a symlink; \
                 replace it with a file first"
            );
        }
    }
    Ok(())
}

/// Runs the package installation and the script inside the image.
fn run_in_chroot(
    mount: &Path,
    root: &ImageDir,
    c: &Checked,
    fail_at: Option<&str>,
    progress: bool,
) -> Result<(), PreinstallError> {
    check_chroot_dirs(root).map_err(step("chroot"))?;
    let session = ChrootSession::enter(mount).map_err(step("chroot"))?;
    if !c.packages.is_empty() {
        let spin = bar(
            progress,
            None,
            format!("apt-get install {}", c.packages.join(" ")),
        );
        tracing::info!("installing {} in the image", c.packages.join(", "));
        session
            .cmd("apt-get")
            .args(["-q", "update"])
            .run()
            .map_err(step("apt-get update"))?;
        session
            .apt_install(&c.packages)
            .map_err(step("apt-get install"))?;
        session
            .cmd("apt-get")
            .arg("clean")
            .run()
            .map_err(step("apt-get clean"))?;
        // Inside the chroot, so a symlinked lists directory resolves in the image.
        session
            .cmd("/bin/sh")
            .arg("-c")
            .arg(
                "find /var/lib/apt/lists -mindepth 1 -maxdepth 1 \
                 ! -name lock ! -name partial -exec rm -rf {} +",
            )
            .run()
            .map_err(step("removing apt lists"))?;
        spin.finish_and_clear();
    }
    checkpoint(fail_at, "after-packages")?;
    if let Some((name, body)) = &c.script {
        let tmp = root
            .open_path(Path::new("/tmp"), true)
            .map_err(step("--run"))?;
        let file = format!(
            "mkimage-preinstall-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let in_image = format!("/tmp/{file}");
        {
            use std::io::Write;
            let mut f = tmp
                .create_file(OsStr::new(&file), 0o700)
                .map_err(step("--run"))?;
            f.write_all(body).map_err(step("--run"))?;
            f.sync_all().map_err(step("--run"))?;
        }
        let inner = if body.starts_with(b"#!") {
            "cd \"$1\" && exec \"$2\""
        } else {
            "cd \"$1\" && exec /bin/sh \"$2\""
        };
        tracing::info!("running {name} in the image");
        let spin = bar(progress, None, format!("running {name} in the image"));
        let res = session
            .cmd("/usr/bin/env")
            .arg(format!("MKIMAGE_APP_DIR={}", c.dest.display()))
            .args(["/bin/sh", "-c", inner, "mkimage-preinstall"])
            .arg(&c.dest)
            .arg(&in_image)
            .run();
        spin.finish_and_clear();
        let removed = tmp.remove_file(OsStr::new(&file));
        res.map_err(step("--run script"))?;
        removed.map_err(step("--run"))?;
    }
    session.exit().map_err(step("leaving the chroot"))?;
    Ok(())
}

/// The file size `--grow` asks for (the current size when not growing).
fn grow_target(layout: &Layout, size: u64, grow: Option<Grow>) -> Result<u64, PreinstallError> {
    let target = match grow {
        None => return Ok(size),
        Some(Grow::By(n)) => size.saturating_add(n),
        Some(Grow::To(n)) => n,
    };
    if target < size {
        return Err(bad(format!(
            "--grow: the image is already {} MiB; shrinking is not supported",
            size >> 20
        )));
    }
    if target % 512 != 0 {
        return Err(bad("--grow: the size must be a multiple of 512 bytes"));
    }
    if target > size && !layout.root_is_last() {
        return Err(bad(
            "--grow: the root partition is not the last one on the disk, so it cannot grow",
        ));
    }
    Ok(target)
}

/// Preinstalls APP_DIR (and packages, and a script) into a copy of IMAGE.
pub fn run(args: &PreinstallArgs) -> Result<PreinstallReport, PreinstallError> {
    signals::install();
    let started = Instant::now();
    let env_fail = std::env::var(FAIL_ENV).ok();
    let fail_at = args.fail_at.as_deref().or(env_fail.as_deref());
    let c = check_args(args)?;

    // 1. What the input is, and whether it is the image we expect. Nothing written yet.
    let info = disk::image_info(&c.image).map_err(|e| bad(format!("{e:#}")))?;
    if info.format != "raw" && info.format != "qcow2" {
        return Err(bad(format!(
            "{} is a {} image; preinstall takes raw or qcow2 (convert with qemu-img)",
            c.image.display(),
            info.format
        )));
    }
    if let Some(b) = &info.backing_file {
        return Err(bad(format!(
            "{} is an overlay on {b}; flatten it first (qemu-img convert)",
            c.image.display()
        )));
    }
    let expected = expectation(args, &c.image)?;
    let input_digests: Option<Digests> = match &expected {
        Some(e) => {
            let size = std::fs::metadata(&c.image).map(|m| m.len()).ok();
            let pb = bar(args.progress, size, "verifying input".into());
            let d = verify::verify(&c.image, e, |n| pb.set_position(n)).map_err(|e| {
                if signals::interrupted() {
                    PreinstallError::Interrupted(signals::signal().unwrap_or(2))
                } else {
                    PreinstallError::Verify(e)
                }
            })?;
            pb.finish_and_clear();
            tracing::info!("{}: digest matches ({})", c.image.display(), e.source);
            Some(d)
        }
        None => {
            tracing::warn!("{}: not verified (--no-verify)", c.image.display());
            None
        }
    };

    // A raw input can be inspected in place, so a layout or --grow problem is
    // reported before anything is written.
    if info.format == "raw" {
        let layout = disk::detect_layout(&c.image).map_err(|e| bad(format!("{e:#}")))?;
        grow_target(&layout, info.virtual_size, c.grow)?;
    }

    // 2. The working copy. From here on the guards clean up.
    let out_dir = c.output.parent().unwrap_or(Path::new(".")).to_owned();
    let out_name = c
        .output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pending = PendingFile::new(&c.output);
    let work_path = out_dir.join(format!(".{out_name}.preinstall-{}", std::process::id()));
    if work_path.exists() {
        fsutil::remove_tree(&work_path).map_err(step("work directory"))?;
    }
    std::fs::create_dir(&work_path).map_err(step("work directory"))?;
    let work = WorkDir(work_path);
    let raw: PathBuf = {
        let spin = bar(args.progress, None, "copying the image".into());
        let r = if info.format == "raw" {
            copy_image(&c.image, pending.path()).map_err(step("copying the image"))?;
            pending.path().to_owned()
        } else {
            let r = work.0.join("disk.raw");
            Cmd::new("qemu-img")
                .args(["convert", "-f", &info.format, "-O", "raw"])
                .arg(&c.image)
                .arg(&r)
                .run()
                .map_err(step("converting to raw"))?;
            r
        };
        spin.finish_and_clear();
        r
    };
    checkpoint(fail_at, "after-workcopy")?;

    // 3. Where the root filesystem is.
    let mut layout = disk::detect_layout(&raw).map_err(|e| bad(format!("{e:#}")))?;
    tracing::info!("{}: {}", c.image.display(), layout.describe());
    let fs_bytes_before = layout.root_fs().bytes();

    // 4. Grow.
    let size_before = std::fs::metadata(&raw).map_err(step("grow"))?.len();
    let mut grown_by = 0;
    let target = grow_target(&layout, size_before, c.grow)?;
    if target > size_before {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&raw)
            .map_err(step("grow"))?;
        f.set_len(target).map_err(step("grow"))?;
        drop(f);
        if let Layout::Partitioned { table, .. } = &layout {
            let n = layout.root_partition().expect("partitioned").number;
            disk::grow_partition_to_end(&raw, table, n).map_err(step("growing the partition"))?;
        }
        layout = disk::detect_layout(&raw).map_err(step("grow"))?;
        grown_by = target - size_before;
    }

    // 5. Loop device and mount.
    let (offset, len) = layout.root_range();
    let lo = LoopDevice::attach(&raw, offset, len, false).map_err(step("loop device"))?;
    if grown_by > 0 {
        let spin = bar(args.progress, None, "e2fsck and resize2fs".into());
        disk::e2fsck(lo.path()).map_err(step("e2fsck"))?;
        disk::resize2fs(lo.path()).map_err(step("resize2fs"))?;
        spin.finish_and_clear();
    }
    let mnt_dir = work.0.join("root");
    std::fs::create_dir(&mnt_dir).map_err(step("mount"))?;
    let mnt = MountGuard::mount(lo.path(), &mnt_dir, "ext4", None).map_err(step("mount"))?;
    checkpoint(fail_at, "after-mount")?;

    // 6. The application.
    let root = ImageDir::open_root(&mnt_dir).map_err(step("mount"))?;
    let total = copy::tree_bytes(&c.app_dir);
    let pb = bar(args.progress, Some(total), "copying the application".into());
    let copied = copy::copy_tree(&c.app_dir, &root, &c.dest, &pb)
        .map_err(step("copying the application"))?;
    pb.finish_and_clear();
    tracing::info!(
        "copied {} files, {} directories, {} symlinks ({} bytes) to {}; {} skipped",
        copied.files,
        copied.dirs,
        copied.symlinks,
        copied.bytes,
        c.dest.display(),
        copied.skipped.len()
    );
    checkpoint(fail_at, "after-copy")?;

    // 7. Packages and script.
    if !c.packages.is_empty() || c.script.is_some() {
        run_in_chroot(&mnt_dir, &root, &c, fail_at, args.progress)?;
    }
    checkpoint(fail_at, "after-chroot")?;
    let dpkg_real = root.open_path(Path::new("/var/lib/dpkg"), false).is_ok();
    let packages = if dpkg_real {
        crate::build::installed_packages(&mnt_dir)
    } else {
        vec![]
    };
    let fs_bytes_after = disk::read_ext_superblock(lo.path(), 0)
        .ok()
        .flatten()
        .map(|s| s.bytes())
        .unwrap_or(fs_bytes_before);
    drop(root);

    // 8. Release, convert, hash, publish.
    mnt.unmount().map_err(step("unmount"))?;
    if let Err(e) = lo.detach() {
        // Autoclear frees it anyway once closed; only log.
        tracing::debug!("detach: {e}");
    }
    checkpoint(fail_at, "after-unmount")?;
    if info.format != "raw" {
        let spin = bar(
            args.progress,
            None,
            format!("converting to {}", info.format),
        );
        Cmd::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", &info.format])
            .arg(&raw)
            .arg(pending.path())
            .run()
            .map_err(step("converting back"))?;
        spin.finish_and_clear();
    }
    let out_size = std::fs::metadata(pending.path())
        .map_err(step("output"))?
        .len();
    let pb = bar(args.progress, Some(out_size), "hashing the output".into());
    let digests = verify::digest_file(pending.path(), |n| pb.set_position(n))
        .map_err(step("hashing the output"))?;
    pb.finish_and_clear();
    let output = pending.commit().map_err(step("output"))?;
    let (size, allocated) = fsutil::sizes(&output).map_err(step("output"))?;
    let format = if info.format == "raw" && matches!(layout, Layout::Bare { .. }) {
        layout.root_fs().kind.to_string()
    } else {
        info.format.clone()
    };
    let record = serde_json::json!({
        "created": crate::build::now_rfc3339(),
        "input": c.image.file_name().map(|n| n.to_string_lossy().into_owned()),
        "input_md5": input_digests.as_ref().map(|d| d.md5.clone()),
        "input_sha256": input_digests.as_ref().map(|d| d.sha256.clone()),
        "verified": input_digests.is_some(),
        "app_dir": c.app_dir.display().to_string(),
        "app_digest": copied.digest,
        "dest": c.dest.display().to_string(),
        "files": copied.files,
        "bytes": copied.bytes,
        "skipped": copied.skipped,
        "packages": c.packages,
        "script": c.script.as_ref().map(|(n, _)| n.clone()),
        "script_sha256": c.script.as_ref().map(|(_, b)| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(b))
        }),
        "grown_by": grown_by,
    });
    let manifest_path = Manifest::path_for(&output);
    write_manifest(
        &c.image,
        args.manifest.as_ref().and_then(|m| m.clone()),
        &manifest_path,
        Artefact {
            file: out_name.clone(),
            format: format.clone(),
            size,
            allocated,
            md5: digests.md5.clone(),
            sha256: digests.sha256.clone(),
        },
        packages,
        record,
        started.elapsed().as_secs_f64(),
    )
    .map_err(step("manifest"))?;
    verify::update_sums_file(&out_dir.join("MD5SUMS"), &out_name, &digests.md5)
        .and_then(|_| {
            verify::update_sums_file(&out_dir.join("SHA256SUMS"), &out_name, &digests.sha256)
        })
        .map_err(step("sums files"))?;
    drop(work);
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        "wrote {} in {seconds:.1} s, md5 {}",
        output.display(),
        digests.md5
    );
    Ok(PreinstallReport {
        output,
        manifest: manifest_path,
        format,
        layout: layout.describe(),
        input_md5: input_digests.as_ref().map(|d| d.md5.clone()),
        input_sha256: input_digests.map(|d| d.sha256),
        md5: digests.md5,
        sha256: digests.sha256,
        size,
        grown_by,
        fs_bytes_before,
        fs_bytes_after,
        copy: copied,
        packages_requested: c.packages.clone(),
        script: c.script.as_ref().map(|(n, _)| n.clone()),
        seconds,
    })
}

/// Writes the output's manifest: the input's (if any) carried over with new
/// artefacts, package list and build id, plus a `preinstall` record appended to
/// the list of earlier ones. Registrations are dropped (the new image has none).
#[allow(clippy::too_many_arguments)]
fn write_manifest(
    image: &Path,
    given: Option<PathBuf>,
    path: &Path,
    artefact: Artefact,
    packages: Vec<String>,
    record: serde_json::Value,
    seconds: f64,
) -> anyhow::Result<()> {
    use sha2::Digest;
    let input_manifest = given.unwrap_or_else(|| Manifest::path_for(image));
    let (base, mut history) = match Manifest::load(&input_manifest) {
        Ok(m) => {
            let raw: serde_json::Value = std::fs::read(&input_manifest)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let history = raw["preinstall"].as_array().cloned().unwrap_or_default();
            (Some(m), history)
        }
        Err(_) => (None, vec![]),
    };
    let key = hex::encode(sha2::Sha256::digest(record.to_string().as_bytes()));
    let stage = StageRecord {
        name: "preinstall".into(),
        key,
        cached: false,
        seconds,
    };
    let build_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let mut record = record;
    let m = match base {
        Some(mut m) => {
            record["base_build_id"] = serde_json::Value::String(m.build_id.clone());
            m.tool_version = env!("CARGO_PKG_VERSION").into();
            m.build_id = build_id;
            m.created = crate::build::now_rfc3339();
            m.stages.push(stage);
            if !packages.is_empty() {
                m.packages = packages;
            }
            m.artefacts = vec![artefact];
            m.registrations = vec![];
            m
        }
        None => Manifest {
            tool_version: env!("CARGO_PKG_VERSION").into(),
            build_id,
            created: crate::build::now_rfc3339(),
            recipe_digest: String::new(),
            recipe: serde_json::Value::Null,
            stages: vec![stage],
            packages,
            artefacts: vec![artefact],
            registrations: vec![],
            preinstall: vec![],
        },
    };
    history.push(record);
    let mut v = serde_json::to_value(&m)?;
    v["preinstall"] = serde_json::Value::Array(history);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&v)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, FromArgMatches};

    #[test]
    fn grow_sizes() {
        assert_eq!(parse_grow("+256M"), Ok(Grow::By(256 << 20)));
        assert_eq!(parse_grow("3G"), Ok(Grow::To(3 << 30)));
        assert!(parse_grow("+x").is_err());
    }

    #[test]
    fn package_names() {
        for ok in [
            "jq",
            "tree",
            "python3-flask",
            "libc6=2.36-9",
            "g++",
            "nginx/bookworm-backports",
        ] {
            assert!(valid_package(ok), "{ok}");
        }
        for no in [
            "-o",
            "--allow-unauthenticated",
            "a b",
            "j",
            "Foo;rm",
            "x=",
            "",
        ] {
            assert!(!valid_package(no), "{no}");
        }
    }

    #[test]
    fn dest_rules() {
        assert_eq!(
            check_dest(Path::new("/opt/app")).unwrap(),
            Path::new("/opt/app")
        );
        assert_eq!(
            check_dest(Path::new("/opt//app/")).unwrap(),
            Path::new("/opt/app")
        );
        for no in ["opt/app", "/", "/opt/../etc", "/proc/x", "/dev"] {
            assert!(check_dest(Path::new(no)).is_err(), "{no}");
        }
    }

    #[test]
    fn default_output_name() {
        assert_eq!(
            default_output(Path::new("/x/conpaas.img")),
            Path::new("/x/conpaas-preinstalled.img")
        );
        assert_eq!(
            default_output(Path::new("/x/disk.qcow2")),
            Path::new("/x/disk-preinstalled.qcow2")
        );
        assert_eq!(
            default_output(Path::new("/x/disk")),
            Path::new("/x/disk-preinstalled")
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(bad("x").exit_code(), 2);
        assert_eq!(PreinstallError::Interrupted(2).exit_code(), 130);
        assert_eq!(
            PreinstallError::Step {
                step: "s",
                source: anyhow::anyhow!("e")
            }
            .exit_code(),
            1
        );
        let mismatch = VerifyError::Mismatch {
            path: "a".into(),
            kind: "MD5",
            expected: "0".into(),
            actual: "1".into(),
            source_: "t".into(),
        };
        assert_eq!(PreinstallError::Verify(mismatch).exit_code(), 1);
    }

    #[test]
    fn cli_parses_and_documents_examples() {
        let cmd = PreinstallArgs::augment_args(clap::Command::new("preinstall"));
        let m = cmd
            .clone()
            .try_get_matches_from([
                "preinstall",
                "a.img",
                "app",
                "--packages",
                "jq,tree",
                "--packages",
                "curl",
                "--grow",
                "+512M",
                "--manifest",
                "--run",
                "s.sh",
            ])
            .unwrap();
        let a = PreinstallArgs::from_arg_matches(&m).unwrap();
        assert_eq!(a.packages, ["jq", "tree", "curl"]);
        assert_eq!(a.manifest, Some(None));
        assert_eq!(a.dest, Path::new(DEFAULT_DEST));
        assert_eq!(a.grow.as_deref(), Some("+512M"));
        assert!(a.progress);
        assert!(cmd
            .clone()
            .try_get_matches_from(["preinstall", "a.img", "app", "--md5", "x", "--no-verify"])
            .is_err());
        let m = cmd
            .clone()
            .try_get_matches_from(["preinstall", "--manifest=m.json", "a.img", "app"])
            .unwrap();
        let a = PreinstallArgs::from_arg_matches(&m).unwrap();
        assert_eq!(a.manifest, Some(Some(PathBuf::from("m.json"))));
        assert_eq!(a.image, Path::new("a.img"));
        let help = cmd.clone().render_long_help().to_string();
        assert!(help.contains("Examples:"), "{help}");
    }
}
