//! `boot-test`: boots an image under QEMU and waits for it to say it is ready.
//!
//! KVM is used where it can boot a Linux guest; on hosts where /dev/kvm is a
//! nested software hypervisor (no vmx/svm flags, or the `kvm_pvm` module) it
//! cannot, so that is detected up front — and, should KVM still hang, a guest
//! kernel that prints nothing within a short time makes us fall back to TCG.
//! qemu runs in its own process group and is killed by pid when the guard drops:
//! on success, on timeout, on error and on Ctrl-C.

use crate::host::signals;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Accel {
    /// KVM when it can boot a guest here, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

/// What "ready" means for the guest.
#[derive(Debug, Clone)]
pub enum Readiness {
    /// A line on the serial console containing this text.
    SerialMarker(String),
    /// A TCP connection to this host port (forwarded into the guest) is accepted and
    /// the check function returns true.
    Probe(Duration, fn(u16) -> bool, u16),
    /// A shell command that exits 0 once the guest is ready (e.g. a `cps client`
    /// call of the agent's check method over mutual TLS on a forwarded port).
    Command(String),
}

/// A guest connection to `guest_ip:guest_port` is relayed to `host` (an address on
/// the host, usually 127.0.0.1:PORT) by `mkimage relay`, one process per connection.
#[derive(Debug, Clone)]
pub struct GuestForward {
    pub guest_ip: String,
    pub guest_port: u16,
    pub host: String,
}

#[derive(Debug, Clone)]
pub struct BootOptions {
    pub image: PathBuf,
    pub format: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    pub timeout: Duration,
    pub ready: Readiness,
    /// (host port on 127.0.0.1, guest port)
    pub forwards: Vec<(u16, u16)>,
    pub serial_log: PathBuf,
    /// Extra read-only drives (config drives, seed images).
    pub extra_drives: Vec<PathBuf>,
    /// Guest-to-host forwards (metadata service, manager enrolment endpoint).
    pub guest_forwards: Vec<GuestForward>,
    /// The user network's address range (qemu's `net=`). A guest forward's address
    /// must lie inside it: EC2's metadata address 169.254.169.254 needs a
    /// link-local network.
    pub user_net: Option<String>,
    /// How long a KVM guest may stay silent before we switch to TCG.
    pub kvm_grace: Duration,
}

impl BootOptions {
    pub fn new(image: &Path, serial_log: &Path) -> BootOptions {
        BootOptions {
            image: image.to_owned(),
            format: "raw".into(),
            memory_mib: 1024,
            cpus: 2,
            accel: Accel::Auto,
            timeout: Duration::from_secs(300),
            ready: Readiness::SerialMarker(crate::stage::system::READY_MARKER.into()),
            forwards: vec![],
            serial_log: serial_log.to_owned(),
            extra_drives: vec![],
            guest_forwards: vec![],
            user_net: None,
            kvm_grace: Duration::from_secs(25),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BootReport {
    /// The accelerator that ran the successful boot.
    pub accel: &'static str,
    pub seconds_to_ready: f64,
    /// Why KVM was not used, when it was not.
    pub kvm_note: Option<String>,
    pub serial_log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot start qemu: {0} (install the Debian package `qemu-system-x86`)")]
    Spawn(std::io::Error),
    #[error("guest not ready after {seconds:.0} s ({accel}); last serial lines:\n{tail}\n  serial log: {}", log.display())]
    Timeout {
        seconds: f64,
        accel: &'static str,
        tail: String,
        log: PathBuf,
    },
    #[error("qemu exited ({status}) before the guest was ready; last serial lines:\n{tail}\n  serial log: {}", log.display())]
    Exited {
        status: String,
        tail: String,
        log: PathBuf,
    },
    #[error("KVM was requested but cannot boot a guest here: {0}")]
    NoKvm(String),
    #[error("interrupted; qemu was stopped")]
    Interrupted,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Why KVM cannot boot a Linux guest on this host, or `None` when it should.
pub fn kvm_unusable_reason() -> Option<String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm is missing or not accessible".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "/dev/kvm is kvm_pvm, a nested software hypervisor that hangs Linux guests".into(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_vt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !has_vt {
        return Some(
            "the CPU shows no vmx/svm flag, so /dev/kvm is not hardware virtualisation".into(),
        );
    }
    None
}

/// A running qemu, killed (by pid, with its process group) when dropped.
pub struct QemuGuard {
    child: Child,
    ticket: Option<crate::journal::Ticket>,
}

impl QemuGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if qemu has already exited.
    pub fn exited(&mut self) -> Option<String> {
        self.child.try_wait().ok().flatten().map(|s| s.to_string())
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.wait();
        crate::journal::release(self.ticket.take());
        tracing::debug!("qemu {} stopped", self.child.id());
    }
}

/// The qemu command line for one boot attempt.
pub fn qemu_args(opts: &BootOptions, kvm: bool) -> Vec<String> {
    let mut a: Vec<String> = vec!["-name".into(), "mkimage-boot-test".into()];
    if kvm {
        a.extend(["-accel".into(), "kvm".into()]);
    } else {
        a.extend(["-accel".into(), "tcg,thread=multi".into()]);
    }
    a.extend([
        "-smp".into(),
        opts.cpus.to_string(),
        "-m".into(),
        opts.memory_mib.to_string(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", opts.serial_log.display()),
        "-no-reboot".into(),
        // Entropy from the host, as clouds give it: without it, the first getrandom()
        // of a TCG guest (no RDRAND, a predictable cycle counter) can block for minutes.
        "-device".into(),
        "virtio-rng-pci".into(),
        // snapshot=on: the boot never writes to the image, so its checksums stay valid.
        "-drive".into(),
        format!(
            "file={},format={},if=virtio,snapshot=on",
            opts.image.display(),
            opts.format
        ),
    ]);
    for d in &opts.extra_drives {
        a.extend([
            "-drive".into(),
            format!("file={},format=raw,if=virtio,readonly=on", d.display()),
        ]);
    }
    // restrict=on: the guest reaches nothing outside; only our forwards come in.
    let mut net = "user,id=n0,restrict=on".to_string();
    if let Some(n) = &opts.user_net {
        net.push_str(&format!(",net={n}"));
    }
    for (h, g) in &opts.forwards {
        net.push_str(&format!(",hostfwd=tcp:127.0.0.1:{h}-:{g}"));
    }
    if !opts.guest_forwards.is_empty() {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("mkimage"));
        for f in &opts.guest_forwards {
            net.push_str(&format!(
                ",guestfwd=tcp:{}:{}-cmd:{} relay {}",
                f.guest_ip,
                f.guest_port,
                exe.display(),
                f.host
            ));
        }
    }
    a.extend([
        "-netdev".into(),
        net,
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ]);
    a
}

fn spawn(opts: &BootOptions, kvm: bool) -> Result<QemuGuard, BootError> {
    let _ = std::fs::remove_file(&opts.serial_log);
    if let Some(d) = opts.serial_log.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&opts.serial_log, b"")?;
    let args = qemu_args(opts, kvm);
    tracing::debug!("$ qemu-system-x86_64 {}", args.join(" "));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(id) = crate::journal::active_id() {
        cmd.env(crate::journal::ENV_MARKER, id);
    }
    let child = cmd.spawn().map_err(BootError::Spawn)?;
    let pid = child.id() as i32;
    let ticket = crate::journal::acquire(crate::journal::Resource::Process {
        pid,
        start_time: crate::journal::process_start_time(pid).unwrap_or(0),
        program: "qemu-system-x86_64".into(),
    });
    Ok(QemuGuard { child, ticket })
}

fn serial_text(log: &Path) -> String {
    std::fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(log: &Path, n: usize) -> String {
    let t = serial_text(log);
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    {}", l.trim_end_matches('\r')))
        .collect::<Vec<_>>()
        .join("\n")
}

enum Attempt {
    Ready(f64),
    KvmSilent,
}

fn attempt(
    opts: &BootOptions,
    kvm: bool,
    on_ready: &mut dyn FnMut(&mut QemuGuard) -> bool,
) -> Result<Attempt, BootError> {
    let accel = if kvm { "kvm" } else { "tcg" };
    let mut q = spawn(opts, kvm)?;
    let t0 = Instant::now();
    loop {
        if signals::interrupted() {
            return Err(BootError::Interrupted);
        }
        if let Some(status) = q.exited() {
            let mut err = String::new();
            if let Some(mut e) = q.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let mut t = tail(&opts.serial_log, 20);
            if !err.trim().is_empty() {
                t.push_str(&format!("\n  qemu said: {}", err.trim()));
            }
            return Err(BootError::Exited {
                status,
                tail: t,
                log: opts.serial_log.clone(),
            });
        }
        let elapsed = t0.elapsed();
        let ready = match &opts.ready {
            Readiness::SerialMarker(m) => serial_text(&opts.serial_log).contains(m.as_str()),
            Readiness::Probe(_, f, port) => f(*port),
            Readiness::Command(c) => std::process::Command::new("sh")
                .args(["-c", c])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false),
        };
        if ready && on_ready(&mut q) {
            return Ok(Attempt::Ready(elapsed.as_secs_f64()));
        }
        if kvm
            && elapsed > opts.kvm_grace
            && !serial_text(&opts.serial_log).contains("Linux version")
        {
            return Ok(Attempt::KvmSilent);
        }
        if elapsed > opts.timeout {
            return Err(BootError::Timeout {
                seconds: elapsed.as_secs_f64(),
                accel,
                tail: tail(&opts.serial_log, 20),
                log: opts.serial_log.clone(),
            });
        }
        let pause = match &opts.ready {
            Readiness::Probe(p, _, _) => *p,
            Readiness::Command(_) => Duration::from_secs(1),
            _ => Duration::from_millis(200),
        };
        std::thread::sleep(pause);
    }
}

/// Boots the image and waits for readiness. `on_ready` runs while the guest is
/// still up (e.g. to talk to it); returning false keeps waiting.
pub fn boot_test_with(
    opts: &BootOptions,
    mut on_ready: impl FnMut(&mut QemuGuard) -> bool,
) -> Result<BootReport, BootError> {
    signals::install();
    let reason = kvm_unusable_reason();
    let try_kvm = match opts.accel {
        Accel::Tcg => false,
        Accel::Kvm => {
            if let Some(r) = &reason {
                return Err(BootError::NoKvm(r.clone()));
            }
            true
        }
        Accel::Auto => reason.is_none(),
    };
    let mut note = reason;
    if try_kvm {
        match attempt(opts, true, &mut on_ready)? {
            Attempt::Ready(s) => {
                return Ok(BootReport {
                    accel: "kvm",
                    seconds_to_ready: s,
                    kvm_note: None,
                    serial_log: opts.serial_log.clone(),
                })
            }
            Attempt::KvmSilent => {
                let msg = format!(
                    "the guest kernel printed nothing within {} s under KVM",
                    opts.kvm_grace.as_secs()
                );
                if opts.accel == Accel::Kvm {
                    return Err(BootError::NoKvm(msg));
                }
                tracing::warn!("{msg}; retrying under TCG");
                note = Some(msg);
            }
        }
    }
    if let Some(n) = &note {
        tracing::info!("using TCG (software emulation): {n}");
    }
    match attempt(opts, false, &mut on_ready)? {
        Attempt::Ready(s) => Ok(BootReport {
            accel: "tcg",
            seconds_to_ready: s,
            kvm_note: note,
            serial_log: opts.serial_log.clone(),
        }),
        Attempt::KvmSilent => unreachable!("TCG attempts never report KVM silence"),
    }
}

pub fn boot_test(opts: &BootOptions) -> Result<BootReport, BootError> {
    boot_test_with(opts, |_| true)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_command_is_isolated_and_does_not_write_the_image() {
        let mut o = BootOptions::new(Path::new("/x/disk.img"), Path::new("/x/serial.log"));
        o.forwards = vec![(18080, 5555)];
        let a = qemu_args(&o, false).join(" ");
        assert!(a.contains("snapshot=on"));
        assert!(a.contains("restrict=on,hostfwd=tcp:127.0.0.1:18080-:5555"));
        assert!(a.contains("tcg,thread=multi"));
        assert!(a.contains("file:/x/serial.log"));
        assert!(qemu_args(&o, true).join(" ").contains("-accel kvm"));
        o.guest_forwards = vec![GuestForward {
            guest_ip: "169.254.169.254".into(),
            guest_port: 80,
            host: "127.0.0.1:9".into(),
        }];
        let a = qemu_args(&o, false).join(" ");
        assert!(a.contains(",guestfwd=tcp:169.254.169.254:80-cmd:"), "{a}");
        assert!(
            a.ends_with("relay 127.0.0.1:9 -device virtio-net-pci,netdev=n0"),
            "{a}"
        );
    }
}
