//! Stage `core`: the ConPaaS runtime baked into the image — the `cps` binary built
//! from this workspace, its configuration templates, directories and log files,
//! the first-boot contextualization unit, and an SSH server whose host keys are
//! made at first boot (never at build time, so no two instances share them).

use super::{Ctx, StageOps, StageResult};
use crate::host::{ChrootSession, Cmd};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Where the runtime binary is installed in the image.
pub const CPS_PATH: &str = "usr/local/bin/cps";

const CONTEXT_UNIT: &str = "[Unit]
Description=ConPaaS contextualization (metadata, SSH key, user-data, agent or manager start)
Wants=network-online.target
After=network-online.target
Before=ssh.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/bin/cps context apply
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

/// sshd refuses to start without host keys; make them right before it starts.
const SSH_KEYGEN_DROPIN: &str = "[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
";

/// Where a container image takes its contextualization from: a config drive image (ISO 9660,
/// `config-2`) that the container runtime bind-mounts, e.g.
/// `systemd-nspawn --bind-ro=cd.iso:/run/cps-context/config-2.iso`.
pub const CONTAINER_CONFIG_DRIVE: &str = "/run/cps-context/config-2.iso";

/// A container usually shares the host's network: 169.254.169.254 there is the *host's*
/// metadata service, and there are no block devices to find a config drive by label. So the
/// container layout reads only the bind-mounted config drive, and skips the unit without one.
const CONTAINER_CONTEXT_DROPIN: &str = "[Unit]
ConditionPathExists=/run/cps-context/config-2.iso

[Service]
ExecStart=
ExecStart=/usr/local/bin/cps context apply --sources configdrive --config-drive /run/cps-context/config-2.iso
";

/// In a container sharing the host's network, sshd would listen on the host's port 22; the
/// container runtime gives shell access instead.
const CONTAINER_SSH_DROPIN: &str = "[Unit]
ConditionVirtualization=!container
";

/// curl: the cloud scripts of the contextualization (config/templates/cloud) query metadata with it.
pub const PACKAGES: &[&str] = &["openssh-server", "ca-certificates", "curl"];

pub struct Core {
    pub cps_binary: PathBuf,
    pub config_dir: PathBuf,
    /// Layout `container`: contextualization from a bind-mounted config drive only, no sshd.
    pub container: bool,
}

/// Finds the `cps` binary: `MKIMAGE_CPS_BIN`, else next to this executable (cargo
/// puts all workspace binaries in one directory), else on PATH.
pub fn find_cps_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MKIMAGE_CPS_BIN") {
        return Some(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            for cand in [dir.join("cps"), dir.join("../cps")] {
                if cand.is_file() {
                    return Some(cand);
                }
            }
        }
    }
    crate::host::fsutil::which("cps")
}

/// Finds the runtime's `config/` tree: `MKIMAGE_CONFIG_DIR`, else the workspace's.
pub fn find_config_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("MKIMAGE_CONFIG_DIR") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

/// Whether an ELF64 little-endian file has `.debug*` sections; `None` when it is not
/// such a file (the caller then strips anyway and lets `strip` judge).
fn has_debug_sections(path: &Path) -> Option<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh).ok()?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as u64;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (shoff, shentsize, shnum, shstrndx) = (
        u64_at(&eh, 0x28),
        u16_at(&eh, 0x3a),
        u16_at(&eh, 0x3c),
        u16_at(&eh, 0x3e),
    );
    if shentsize < 64 || shnum == 0 || shstrndx >= shnum || shnum > 4096 {
        return None;
    }
    let mut table = vec![0u8; (shentsize * shnum) as usize];
    f.seek(SeekFrom::Start(shoff)).ok()?;
    f.read_exact(&mut table).ok()?;
    let header = |i: u64| &table[(i * shentsize) as usize..((i + 1) * shentsize) as usize];
    let strtab = header(shstrndx);
    let (str_off, str_len) = (u64_at(strtab, 0x18), u64_at(strtab, 0x20));
    if str_len > 1 << 20 {
        return None;
    }
    let mut names = vec![0u8; str_len as usize];
    f.seek(SeekFrom::Start(str_off)).ok()?;
    f.read_exact(&mut names).ok()?;
    Some((0..shnum).any(|i| {
        let at = u32_at(header(i), 0) as usize;
        names.get(at..).is_some_and(|n| n.starts_with(b".debug"))
    }))
}

fn digest_file(p: &Path) -> String {
    crate::verify::sha256_file(p).unwrap_or_default()
}

fn digest_tree(dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(
            f.strip_prefix(dir)
                .unwrap_or(&f)
                .to_string_lossy()
                .as_bytes(),
        );
        h.update(std::fs::read(&f).unwrap_or_default());
    }
    hex::encode(h.finalize())
}

impl StageOps for Core {
    fn name(&self) -> String {
        "core".into()
    }

    fn describe(&self) -> String {
        format!(
            "ConPaaS runtime {} + config, contextualization unit, openssh (keys at first boot)",
            self.cps_binary.display()
        )
    }

    /// A cache layer: its inputs define the tree it leaves.
    fn cacheable(&self) -> bool {
        true
    }

    fn inputs(&self) -> serde_json::Value {
        json!({
            "cps_sha256": digest_file(&self.cps_binary),
            "config_sha256": digest_tree(&self.config_dir),
            "packages": PACKAGES,
            "context_unit": CONTEXT_UNIT,
            "container": self.container,
        })
    }

    fn check(&self, _ctx: &Ctx) -> StageResult {
        if !self.cps_binary.is_file() {
            anyhow::bail!(
                "the runtime binary {} is missing: build it with `cargo build --release -p runtime` or set MKIMAGE_CPS_BIN",
                self.cps_binary.display()
            );
        }
        if !self.config_dir.join("agent").is_dir() {
            anyhow::bail!(
                "the runtime config tree {} is missing (set MKIMAGE_CONFIG_DIR)",
                self.config_dir.display()
            );
        }
        Ok(())
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        let chroot = ChrootSession::enter(&ctx.rootfs)?;
        super::fail_point("core")?;
        // Normally installed with the base (plan::stages hoists them); a tree from
        // elsewhere gets them here.
        let wanted: Vec<String> = PACKAGES.iter().map(|s| s.to_string()).collect();
        let missing = crate::build::missing_packages(&ctx.rootfs, &wanted);
        if !missing.is_empty() {
            chroot.cmd("apt-get").args(["-q", "update"]).run()?;
            chroot.apt_install(&missing)?;
        }
        // Host keys made by openssh-server's postinst would be shared by every
        // instance of the image: remove them, they are made at first boot.
        for e in std::fs::read_dir(ctx.root_path("etc/ssh"))?.flatten() {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                std::fs::remove_file(e.path())?;
            }
        }
        // Root gets no usable password: log in with the cloud's SSH key.
        chroot.cmd("passwd").args(["--lock", "root"]).run()?;
        chroot.exit()?;

        let cps = ctx.root_path(CPS_PATH);
        std::fs::create_dir_all(cps.parent().unwrap())?;
        // Debug builds carry ~100 MB of debug info the image does not need. A release
        // build has none, and copying it costs a tenth of running strip on it.
        if has_debug_sections(&self.cps_binary).unwrap_or(true) {
            Cmd::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&cps)
                .arg(&self.cps_binary)
                .run()?;
        } else {
            let _ = std::fs::remove_file(&cps);
            std::fs::copy(&self.cps_binary, &cps)?;
        }
        let share = ctx.root_path("usr/share/cps/config");
        if share.exists() {
            crate::host::fsutil::remove_tree(&share)?;
        }
        std::fs::create_dir_all(share.parent().unwrap())?;
        crate::cache::copy_tree(&self.config_dir, &share)?;

        for role in ["agent", "manager"] {
            for d in [
                format!("etc/cps{role}"),
                format!("var/tmp/cps{role}"),
                format!("var/cache/cps{role}"),
            ] {
                std::fs::create_dir_all(ctx.root_path(&d))?;
            }
            ctx.write_file(&format!("var/log/cps{role}.log"), "")?;
        }
        // /var/run is a tmpfs: its directories are made at every boot.
        ctx.write_file(
            "usr/lib/tmpfiles.d/cps.conf",
            "d /run/cpsagent 0755 root root -\nd /run/cpsmanager 0755 root root -\n",
        )?;
        ctx.write_file("etc/systemd/system/cps-context.service", CONTEXT_UNIT)?;
        ctx.write_file(
            "etc/systemd/system/ssh.service.d/mkimage-host-keys.conf",
            SSH_KEYGEN_DROPIN,
        )?;
        if self.container {
            ctx.write_file(
                "etc/systemd/system/cps-context.service.d/container.conf",
                CONTAINER_CONTEXT_DROPIN,
            )?;
            ctx.write_file(
                "etc/systemd/system/ssh.service.d/container.conf",
                CONTAINER_SSH_DROPIN,
            )?;
        }
        let wants = ctx.root_path("etc/systemd/system/multi-user.target.wants");
        std::fs::create_dir_all(&wants)?;
        let link = wants.join("cps-context.service");
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink("/etc/systemd/system/cps-context.service", &link)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn debug_sections_are_found_only_where_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.c");
        std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
        let cc = |flag: &str, out: &Path| {
            let st = std::process::Command::new("cc")
                .args([flag, "-o"])
                .arg(out)
                .arg(&src)
                .status()
                .expect("cc (gcc) is needed by this test");
            assert!(st.success());
        };
        let (with, without) = (dir.path().join("with"), dir.path().join("without"));
        cc("-g", &with);
        cc("-g0", &without);
        assert_eq!(super::has_debug_sections(&with), Some(true));
        assert_eq!(super::has_debug_sections(&without), Some(false));
        // Not an ELF file: unknown, so the caller strips anyway.
        assert_eq!(super::has_debug_sections(&src), None);
    }
}
