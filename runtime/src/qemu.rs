//! The `qemu` cloud driver: every node is a QEMU virtual machine on this host, booted from an
//! image built by mkimage.
//!
//! Per node (in `<WORK_DIR>/<vmid>/`): a copy-on-write qcow2 overlay over the image, so the
//! image itself is never written; an OpenStack config drive (ISO 9660 labelled `config-2`) with
//! `meta_data.json` and the node's user-data script, which the image's first-boot unit
//! (`cps context apply`) runs; a serial log; qemu's stderr and pid.
//!
//! Networking is QEMU user networking with `restrict=on`: the guest reaches nothing but what is
//! forwarded. The agent port is forwarded from a free port on 127.0.0.1 (that is the node's
//! address for the manager), and the guest reaches the manager at [`MANAGER_GUEST_IP`]: qemu
//! runs `cps relay HOST:PORT` for every guest connection to `10.0.2.100:PORT`, for each manager
//! port a node needs (the enrolment port; agents never call the manager back). The driver puts
//! that address into the node's context (enrolment URL and `MANAGER_IP`) itself, so the
//! controller is unchanged.
//!
//! qemu runs in its own process group with `PR_SET_PDEATHSIG`; the group is killed on node
//! deletion and when the driver is dropped (manager stop and exit); a manager killed outright
//! takes its VMs with it through the death signal.
//!
//! Settings: the `[qemu]` section of the manager config: `IMAGE` (required, raw or qcow2),
//! `FORMAT` (detected), `MEMORY` (MiB, 768), `CPUS` (1), `ACCEL` (`auto`, `kvm`, `tcg`),
//! `WORK_DIR` (default `$VAR_CACHE/qemu-nodes`), `QEMU` (`qemu-system-x86_64`), `QEMU_IMG`
//! (`qemu-img`), `SSH_KEY` (a public key file put into the nodes' metadata), `CONTEXT`
//! (`configdrive`, the default, or `ec2`).
//!
//! With `CONTEXT = ec2` a node gets no config drive: it is contextualized as on EC2. Each node
//! has its own metadata service ([`crate::imds`], IMDSv2 required) that the guest reaches at
//! 169.254.169.254:80 through a guest forward; the user network is then link-local
//! (`169.254.0.0/16`, the guest is 169.254.0.15), the manager is at [`EC2_MANAGER_GUEST_IP`],
//! and the user-data is rendered with the `ec2` cloud script, which reads the instance
//! metadata with a session token.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use serde_json::json;

use crate::cloud::{Cloud, NodeRequest, ServiceNode};
use crate::config::Ini;

/// The address at which a guest reaches the manager (guest-forwarded to the host).
pub const MANAGER_GUEST_IP: &str = "10.0.2.100";
/// The address a guest has on QEMU's user network.
pub const GUEST_IP: &str = "10.0.2.15";
/// With `CONTEXT = ec2`: the user network is link-local, so that the metadata address
/// 169.254.169.254 lies inside it; the guest and the manager have these addresses.
pub const EC2_USER_NET: &str = "169.254.0.0/16";
pub const EC2_GUEST_IP: &str = "169.254.0.15";
pub const EC2_MANAGER_GUEST_IP: &str = "169.254.0.100";
pub const METADATA_IP: &str = "169.254.169.254";

/// How a node gets its contextualization data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextVia {
    /// An OpenStack config drive (ISO 9660 labelled `config-2`).
    ConfigDrive,
    /// An EC2 instance metadata service (IMDSv2) at 169.254.169.254.
    Ec2,
}

impl std::str::FromStr for ContextVia {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "configdrive" | "config-drive" | "" => Ok(ContextVia::ConfigDrive),
            "ec2" => Ok(ContextVia::Ec2),
            o => bail!("CONTEXT must be configdrive or ec2, not '{o}'"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// KVM where it can boot a Linux guest, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            o => bail!("ACCEL must be auto, kvm or tcg, not '{o}'"),
        }
    }
}

/// `[qemu]` settings.
#[derive(Clone, Debug)]
pub struct QemuSettings {
    pub image: PathBuf,
    /// `raw` or `qcow2`; detected from the image when not given.
    pub format: Option<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    pub work_dir: Option<PathBuf>,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    pub ssh_keys: Vec<String>,
    pub context: ContextVia,
}

impl QemuSettings {
    pub const SECTION: &'static str = "qemu";

    /// The `[qemu]` section, or `None` when the config has none.
    pub fn from_ini(ini: &Ini) -> Result<Option<Self>> {
        const S: &str = QemuSettings::SECTION;
        if !ini.has_section(S) {
            return Ok(None);
        }
        let opt = |k: &str| ini.get(S, k).filter(|v| !v.trim().is_empty());
        let mut ssh_keys = Vec::new();
        if let Some(p) = opt("SSH_KEY") {
            let k = std::fs::read_to_string(&p).with_context(|| format!("[qemu] SSH_KEY {p}"))?;
            ssh_keys.push(k.trim().to_string());
        }
        Ok(Some(QemuSettings {
            image: ini.require(S, "IMAGE")?.into(),
            format: opt("FORMAT"),
            memory_mib: ini.parse_or(S, "MEMORY", 768)?,
            cpus: ini.parse_or(S, "CPUS", 1)?,
            accel: ini.get_or(S, "ACCEL", "auto").parse()?,
            work_dir: opt("WORK_DIR").map(PathBuf::from),
            qemu: ini.get_or(S, "QEMU", "qemu-system-x86_64").into(),
            qemu_img: ini.get_or(S, "QEMU_IMG", "qemu-img").into(),
            ssh_keys,
            context: ini.get_or(S, "CONTEXT", "configdrive").parse()?,
        }))
    }
}

/// Why KVM cannot boot a Linux guest on this host, or `None` when it should (the same check
/// as mkimage's boot test: an accessible /dev/kvm that is not the nested `kvm_pvm`, and a CPU
/// showing vmx or svm).
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
    let vt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !vt {
        return Some("the CPU shows no vmx/svm flag".into());
    }
    None
}

/// `qcow2` when the file starts with the qcow magic, else `raw`.
pub fn detect_format(image: &Path) -> Result<String> {
    let mut magic = [0u8; 4];
    let mut f =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let n = f.read(&mut magic)?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2".into()
    } else {
        "raw".into()
    })
}

/// Creates a qcow2 overlay at `overlay` backed by `image` (absolute path, format `format`).
pub fn create_overlay(qemu_img: &Path, image: &Path, format: &str, overlay: &Path) -> Result<()> {
    let out = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(image)
        .arg(overlay)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", qemu_img.display()))?;
    if !out.status.success() {
        bail!(
            "{} create failed ({}): {}",
            qemu_img.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The OpenStack `meta_data.json` of a node.
pub fn meta_data(uuid: &str, hostname: &str, ssh_keys: &[String]) -> serde_json::Value {
    let keys: serde_json::Map<String, serde_json::Value> = ssh_keys
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("key{i}"), json!(k)))
        .collect();
    json!({"uuid": uuid, "hostname": hostname, "name": hostname, "public_keys": keys})
}

/// Writes the config drive tree under `stage` and the ISO (label `config-2`) to `iso`.
pub fn make_config_drive(
    stage: &Path,
    iso: &Path,
    meta: &serde_json::Value,
    user_data: &str,
) -> Result<()> {
    let latest = stage.join("openstack/latest");
    std::fs::create_dir_all(&latest)?;
    std::fs::write(
        latest.join("meta_data.json"),
        serde_json::to_vec_pretty(meta)?,
    )?;
    std::fs::write(latest.join("user_data"), user_data)?;
    let out = Command::new("genisoimage")
        .args(["-quiet", "-V", "config-2", "-r", "-J", "-o"])
        .arg(iso)
        .arg(stage)
        .stdin(Stdio::null())
        .output()
        .context("running genisoimage (Debian package genisoimage)")?;
    if !out.status.success() {
        bail!(
            "genisoimage failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A guest connection to `guest_ip:guest_port` goes to `target` on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestForward {
    pub guest_ip: String,
    pub guest_port: u16,
    pub target: String,
}

/// Everything the qemu command line of one node depends on.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub name: String,
    pub kvm: bool,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk: PathBuf,
    /// None with EC2 contextualization.
    pub config_drive: Option<PathBuf>,
    /// The user network's range (qemu's `net=`); qemu's default when None.
    pub user_net: Option<String>,
    pub serial_log: PathBuf,
    pub host_port: u16,
    pub guest_port: u16,
    pub forwards: Vec<GuestForward>,
    pub relay_bin: PathBuf,
}

pub fn qemu_args(s: &VmSpec) -> Vec<String> {
    let mut a: Vec<String> = vec!["-name".into(), s.name.clone()];
    a.push("-accel".into());
    a.push(if s.kvm { "kvm" } else { "tcg,thread=multi" }.into());
    a.extend([
        "-smp".into(),
        s.cpus.to_string(),
        "-m".into(),
        s.memory_mib.to_string(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", s.serial_log.display()),
        "-drive".into(),
        format!("file={},format=qcow2,if=virtio", s.disk.display()),
        // Entropy from the host, as clouds give it: without it, the first getrandom()
        // of a TCG guest (no RDRAND, a predictable cycle counter) can block for minutes.
        "-device".into(),
        "virtio-rng-pci".into(),
    ]);
    if let Some(cd) = &s.config_drive {
        a.extend([
            "-drive".into(),
            format!("file={},format=raw,if=virtio,readonly=on", cd.display()),
        ]);
    }
    // restrict=on: the guest reaches nothing but the forwards below.
    let mut net = "user,id=n0,restrict=on".to_string();
    if let Some(n) = &s.user_net {
        net.push_str(&format!(",net={n}"));
    }
    net.push_str(&format!(
        ",hostfwd=tcp:127.0.0.1:{}-:{}",
        s.host_port, s.guest_port
    ));
    for f in &s.forwards {
        net.push_str(&format!(
            ",guestfwd=tcp:{}:{}-cmd:{} relay {}",
            f.guest_ip,
            f.guest_port,
            s.relay_bin.display(),
            f.target
        ));
    }
    a.extend([
        "-netdev".into(),
        net,
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ]);
    a
}

/// Copies `input` to a TCP connection to `addr` and the connection to `output` (`cps relay`:
/// qemu runs it with the guest connection on stdin/stdout). Returns when the peer has closed.
pub fn relay<R, W>(addr: &str, mut input: R, mut output: W) -> Result<()>
where
    R: Read + Send + 'static,
    W: Write,
{
    let sock = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let mut up = sock.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut input, &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    // Flushed chunk by chunk: stdout is line-buffered, and a TLS record held back waiting
    // for a newline byte stalls the handshake.
    let mut down = sock;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match down.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if output
            .write_all(&buf[..n])
            .and_then(|_| output.flush())
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// Rewrites the node's context so that it reaches the manager at `guest_ip` through a guest
/// forward; returns the forwards the node needs.
fn redirect_manager(
    vars: &mut crate::context::NodeVars,
    guest_ip: &str,
) -> Result<Vec<GuestForward>> {
    let mut u = url::Url::parse(&vars.enroll_url)
        .with_context(|| format!("enrolment URL '{}'", vars.enroll_url))?;
    let host = match u.host_str() {
        None | Some("0.0.0.0") | Some("") => "127.0.0.1".to_string(),
        Some(h) => h.to_string(),
    };
    let port = u
        .port_or_known_default()
        .context("enrolment URL without port")?;
    u.set_host(Some(guest_ip))?;
    vars.enroll_url = u.to_string();
    vars.manager_ip = guest_ip.to_string();
    Ok(vec![GuestForward {
        guest_ip: guest_ip.to_string(),
        guest_port: port,
        target: format!("{host}:{port}"),
    }])
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

struct Vm {
    node: ServiceNode,
    child: Child,
    dir: PathBuf,
    /// The node's metadata service (EC2 contextualization), stopped with the VM.
    imds: Option<crate::imds::Imds>,
}

/// Dropping a VM sends SIGKILL to qemu's process group (qemu and its relays), reaps qemu and
/// removes the node directory: on deletion, on shutdown, and when a creation is abandoned.
impl Drop for Vm {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.wait();
        self.imds.take();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.dir.display());
            }
        }
    }
}

/// Removes a node directory unless disarmed (a creation that failed or was abandoned).
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub struct QemuCloud {
    name: String,
    settings: QemuSettings,
    image: PathBuf,
    format: String,
    kvm: bool,
    relay_bin: PathBuf,
    work_dir: PathBuf,
    next_vmid: AtomicU64,
    vms: Mutex<HashMap<String, Vm>>,
}

impl QemuCloud {
    /// `relay_bin`: the `cps` binary qemu runs for guest forwards; `default_work_dir` is used
    /// when the settings name none.
    pub fn new(
        name: &str,
        settings: QemuSettings,
        relay_bin: PathBuf,
        default_work_dir: PathBuf,
    ) -> Result<Self> {
        let image = std::fs::canonicalize(&settings.image)
            .with_context(|| format!("[qemu] IMAGE {}", settings.image.display()))?;
        let format = match &settings.format {
            Some(f) => f.clone(),
            None => detect_format(&image)?,
        };
        let kvm = match (settings.accel, kvm_unusable_reason()) {
            (Accel::Tcg, _) => false,
            (Accel::Kvm, Some(r)) => bail!("[qemu] ACCEL = kvm, but KVM cannot be used: {r}"),
            (Accel::Kvm, None) => true,
            (Accel::Auto, None) => true,
            (Accel::Auto, Some(r)) => {
                tracing::info!("qemu cloud: using TCG (software emulation): {r}");
                false
            }
        };
        let work_dir = settings.work_dir.clone().unwrap_or(default_work_dir);
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
        let work_dir = std::fs::canonicalize(&work_dir)?;
        Ok(QemuCloud {
            name: name.to_string(),
            settings,
            image,
            format,
            kvm,
            relay_bin,
            work_dir,
            next_vmid: AtomicU64::new(1),
            vms: Mutex::new(HashMap::new()),
        })
    }

    pub fn uses_kvm(&self) -> bool {
        self.kvm
    }

    /// Kills every VM and removes its directory (manager stop and exit).
    pub fn kill_all(&self) {
        let vms: Vec<Vm> = self
            .vms
            .lock()
            .expect("vms lock")
            .drain()
            .map(|(_, v)| v)
            .collect();
        for vm in vms {
            let id = vm.node.id.clone();
            drop(vm);
            tracing::info!("qemu cloud: killed node {id}");
        }
    }

    /// Prepares the node directory and starts qemu.
    async fn start_vm(&self, vmid: &str, dir: &Path, mut req: NodeRequest) -> Result<Vm> {
        let id = format!("{}{vmid}", self.name);
        let ec2 = self.settings.context == ContextVia::Ec2;
        let manager_ip = if ec2 {
            EC2_MANAGER_GUEST_IP
        } else {
            MANAGER_GUEST_IP
        };
        let mut forwards = redirect_manager(&mut req.vars, manager_ip)?;
        let script = req
            .config
            .render_script(&req.vars, if ec2 { "ec2" } else { "qemu" })?;
        let disk = dir.join("disk.qcow2");
        create_overlay(&self.settings.qemu_img, &self.image, &self.format, &disk)?;
        let (mut config_drive, mut imds, mut user_net) = (None, None, None);
        if ec2 {
            let md = crate::imds::InstanceMetadata {
                instance_id: req.vars.node_id.clone(),
                hostname: id.clone(),
                local_ipv4: EC2_GUEST_IP.into(),
                ssh_keys: self.settings.ssh_keys.clone(),
                user_data: script.into_bytes(),
            };
            let s = crate::imds::Imds::start(md, Some(&crate::imds::log_path(dir)))
                .context("starting the metadata service")?;
            forwards.push(GuestForward {
                guest_ip: METADATA_IP.into(),
                guest_port: 80,
                target: s.addr(),
            });
            imds = Some(s);
            user_net = Some(EC2_USER_NET.to_string());
        } else {
            let iso = dir.join("config.iso");
            make_config_drive(
                &dir.join("config-drive"),
                &iso,
                &meta_data(&req.vars.node_id, &id, &self.settings.ssh_keys),
                &script,
            )?;
            config_drive = Some(iso);
        }
        let spec = VmSpec {
            name: format!("cps-{id}"),
            kvm: self.kvm,
            memory_mib: self.settings.memory_mib,
            cpus: self.settings.cpus,
            disk,
            config_drive,
            user_net,
            serial_log: dir.join("serial.log"),
            host_port: free_port()?,
            guest_port: req.vars.port,
            forwards,
            relay_bin: self.relay_bin.clone(),
        };
        let args = qemu_args(&spec);
        std::fs::write(dir.join("qemu.args"), args.join("\n"))?;
        let err_path = dir.join("qemu.err");
        let mut cmd = Command::new(&self.settings.qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path)?)
            .process_group(0);
        // Die with the manager, whatever way it ends.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.settings.qemu.display()))?;
        let pid = child.id();
        std::fs::write(dir.join("qemu.pid"), pid.to_string())?;
        let mut vm = Vm {
            node: ServiceNode {
                id,
                name: req.vars.node_id.clone(),
                vmid: vmid.to_string(),
                ip: "127.0.0.1".into(),
                private_ip: if ec2 { EC2_GUEST_IP } else { GUEST_IP }.into(),
                cloud: self.name.clone(),
                role: req.role,
                port: spec.host_port,
            },
            child,
            dir: dir.to_path_buf(),
            imds: imds.take(),
        };
        // A bad option or a taken port makes qemu exit at once.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(500) {
            if let Ok(Some(status)) = vm.child.try_wait() {
                let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                bail!("qemu exited at once ({status}): {}", err.trim());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(
            "qemu cloud: started node {} (pid {pid}, {}, agent on 127.0.0.1:{})",
            vm.node.id,
            if self.kvm { "kvm" } else { "tcg" },
            spec.host_port
        );
        Ok(vm)
    }
}

impl Drop for QemuCloud {
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[async_trait]
impl Cloud for QemuCloud {
    fn cloud_name(&self) -> &str {
        &self.name
    }
    fn cloud_type(&self) -> &str {
        "qemu"
    }

    async fn create_node(&self, req: NodeRequest) -> Result<ServiceNode> {
        let vmid = self.next_vmid.fetch_add(1, Ordering::SeqCst).to_string();
        let dir = self.work_dir.join(&vmid);
        if dir.exists() {
            // left over from an earlier manager with the same WORK_DIR
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let mut guard = DirGuard(Some(dir.clone()));
        let vm = self.start_vm(&vmid, &dir, req).await?;
        guard.0 = None;
        let node = vm.node.clone();
        self.vms.lock().expect("vms lock").insert(vmid, vm);
        Ok(node)
    }

    async fn delete_node(&self, node: &ServiceNode) -> Result<()> {
        let vm = self.vms.lock().expect("vms lock").remove(&node.vmid);
        let Some(vm) = vm else {
            bail!("no such node {}", node.id);
        };
        tokio::task::spawn_blocking(move || drop(vm)).await?;
        tracing::info!("qemu cloud: deleted node {}", node.id);
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<ServiceNode>> {
        let vms = self.vms.lock().expect("vms lock");
        let mut v: Vec<_> = vms.values().map(|vm| vm.node.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{ConfigTree, NodeVars};
    use crate::pki::Role;

    fn have(tool: &str) -> bool {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn vars() -> NodeVars {
        NodeVars {
            role: Role::Agent,
            service_type: "helloworld".into(),
            deployment_name: "dep".into(),
            user_id: 1,
            app_id: 2,
            service_id: 1,
            node_id: "dep-u1-a2-s1-helloworld-abcd".into(),
            manager_ip: "127.0.0.1".into(),
            enroll_url: "https://127.0.0.1:4443/enroll".into(),
            token: "tok".into(),
            ca_cert_pem: "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n".into(),
            port: 5555,
            replacements: Default::default(),
            startup_script: None,
        }
    }

    fn spec() -> VmSpec {
        VmSpec {
            name: "cps-iaas1".into(),
            kvm: false,
            memory_mib: 768,
            cpus: 1,
            disk: "/w/1/disk.qcow2".into(),
            config_drive: Some("/w/1/config.iso".into()),
            user_net: None,
            serial_log: "/w/1/serial.log".into(),
            host_port: 40000,
            guest_port: 5555,
            forwards: vec![GuestForward {
                guest_ip: MANAGER_GUEST_IP.into(),
                guest_port: 4443,
                target: "127.0.0.1:4443".into(),
            }],
            relay_bin: "/usr/bin/cps".into(),
        }
    }

    fn arg_after<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn qemu_command_line() {
        let a = qemu_args(&spec());
        assert_eq!(arg_after(&a, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(arg_after(&a, "-m"), ["768"]);
        assert_eq!(arg_after(&a, "-smp"), ["1"]);
        assert_eq!(arg_after(&a, "-serial"), ["file:/w/1/serial.log"]);
        assert_eq!(
            arg_after(&a, "-drive"),
            [
                "file=/w/1/disk.qcow2,format=qcow2,if=virtio",
                "file=/w/1/config.iso,format=raw,if=virtio,readonly=on"
            ]
        );
        assert_eq!(
            arg_after(&a, "-netdev"),
            ["user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40000-:5555,\
              guestfwd=tcp:10.0.2.100:4443-cmd:/usr/bin/cps relay 127.0.0.1:4443"]
        );
        assert_eq!(
            arg_after(&a, "-device"),
            ["virtio-rng-pci", "virtio-net-pci,netdev=n0"]
        );
        let mut s = spec();
        s.kvm = true;
        s.forwards.clear();
        let a = qemu_args(&s);
        assert_eq!(arg_after(&a, "-accel"), ["kvm"]);
        assert!(!a.iter().any(|x| x.contains("guestfwd")));
        // EC2 contextualization: no config drive, a link-local network, the metadata
        // address forwarded.
        let mut s = spec();
        s.config_drive = None;
        s.user_net = Some(EC2_USER_NET.into());
        s.forwards = vec![GuestForward {
            guest_ip: METADATA_IP.into(),
            guest_port: 80,
            target: "127.0.0.1:9".into(),
        }];
        let a = qemu_args(&s);
        assert_eq!(
            arg_after(&a, "-drive"),
            ["file=/w/1/disk.qcow2,format=qcow2,if=virtio"]
        );
        assert_eq!(
            arg_after(&a, "-netdev"),
            [
                "user,id=n0,restrict=on,net=169.254.0.0/16,hostfwd=tcp:127.0.0.1:40000-:5555,\
              guestfwd=tcp:169.254.169.254:80-cmd:/usr/bin/cps relay 127.0.0.1:9"
            ]
        );
    }

    #[test]
    fn manager_address_is_redirected_to_the_guest_forward() {
        let mut v = vars();
        let f = redirect_manager(&mut v, MANAGER_GUEST_IP).unwrap();
        assert_eq!(v.enroll_url, "https://10.0.2.100:4443/enroll");
        assert_eq!(v.manager_ip, "10.0.2.100");
        assert_eq!(
            f,
            [GuestForward {
                guest_ip: "10.0.2.100".into(),
                guest_port: 4443,
                target: "127.0.0.1:4443".into()
            }]
        );
        let mut v = vars();
        v.enroll_url = "https://0.0.0.0:9/enroll".into();
        assert_eq!(
            redirect_manager(&mut v, MANAGER_GUEST_IP).unwrap()[0].target,
            "127.0.0.1:9"
        );
        // the rendered context uses it
        let s = ConfigTree::locate()
            .unwrap()
            .render_script(&v, "qemu")
            .unwrap();
        assert!(s.contains("--url 'https://10.0.2.100:9/enroll'"), "{s}");
        assert!(s.contains("MANAGER_IP = 10.0.2.100"), "{s}");
    }

    #[test]
    fn settings_from_ini() {
        let ini = Ini::parse("[manager]\nCLOUD = qemu\n").unwrap();
        assert!(QemuSettings::from_ini(&ini).unwrap().is_none());
        let ini = Ini::parse("[qemu]\nIMAGE = /i.img\nACCEL = TCG\nMEMORY = 512\n").unwrap();
        let s = QemuSettings::from_ini(&ini).unwrap().unwrap();
        assert_eq!(s.image, PathBuf::from("/i.img"));
        assert_eq!(s.accel, Accel::Tcg);
        assert_eq!((s.memory_mib, s.cpus), (512, 1));
        assert_eq!(s.qemu, PathBuf::from("qemu-system-x86_64"));
        assert!(s.format.is_none() && s.work_dir.is_none());
        let ini = Ini::parse("[qemu]\nACCEL = tcg\n").unwrap();
        assert!(QemuSettings::from_ini(&ini).is_err(), "IMAGE is required");
        let ini = Ini::parse("[qemu]\nIMAGE = /i\nACCEL = xen\n").unwrap();
        assert!(QemuSettings::from_ini(&ini).is_err());
        assert_eq!(s.context, ContextVia::ConfigDrive);
        let ini = Ini::parse("[qemu]\nIMAGE = /i\nCONTEXT = EC2\n").unwrap();
        let s = QemuSettings::from_ini(&ini).unwrap().unwrap();
        assert_eq!(s.context, ContextVia::Ec2);
        let ini = Ini::parse("[qemu]\nIMAGE = /i\nCONTEXT = cd\n").unwrap();
        assert!(QemuSettings::from_ini(&ini).is_err());
    }

    #[test]
    fn config_drive_carries_metadata_and_user_data() {
        if !have("genisoimage") {
            eprintln!("skipped: no genisoimage");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let iso = d.path().join("c.iso");
        let meta = meta_data("uuid-1", "iaas1", &["ssh-ed25519 AAAA k".into()]);
        let script = "#!/bin/bash\necho hi\n";
        make_config_drive(&d.path().join("stage"), &iso, &meta, script).unwrap();
        let stage = d.path().join("stage/openstack/latest");
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(stage.join("meta_data.json")).unwrap()).unwrap();
        assert_eq!(m["uuid"], "uuid-1");
        assert_eq!(m["hostname"], "iaas1");
        assert_eq!(m["public_keys"]["key0"], "ssh-ed25519 AAAA k");
        // The ISO itself: primary volume descriptor (sector 16) says CD001 / config-2.
        let img = std::fs::read(&iso).unwrap();
        assert_eq!(&img[16 * 2048 + 1..16 * 2048 + 6], b"CD001");
        assert_eq!(
            String::from_utf8_lossy(&img[16 * 2048 + 40..16 * 2048 + 72]).trim_end(),
            "config-2"
        );
        if have("isoinfo") {
            let cat = |p: &str| {
                let o = Command::new("isoinfo")
                    .args(["-J", "-i"])
                    .arg(&iso)
                    .args(["-x", p])
                    .output()
                    .unwrap();
                String::from_utf8(o.stdout).unwrap()
            };
            assert_eq!(cat("/openstack/latest/user_data"), script);
            let m: serde_json::Value =
                serde_json::from_str(&cat("/openstack/latest/meta_data.json")).unwrap();
            assert_eq!(m["uuid"], "uuid-1");
        }
    }

    #[test]
    fn overlay_over_a_raw_image() {
        if !have("qemu-img") {
            eprintln!("skipped: no qemu-img");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("base.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        assert_eq!(detect_format(&img).unwrap(), "raw");
        let ov = d.path().join("node.qcow2");
        create_overlay(Path::new("qemu-img"), &img, "raw", &ov).unwrap();
        assert_eq!(detect_format(&ov).unwrap(), "qcow2");
        let o = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&ov)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["backing-filename"], img.display().to_string());
        assert_eq!(info["backing-filename-format"], "raw");
        assert_eq!(info["virtual-size"], 1 << 20);
        // the base is never written
        assert_eq!(std::fs::read(&img).unwrap().len(), 1 << 20);
        assert!(create_overlay(Path::new("qemu-img"), &d.path().join("none"), "raw", &ov).is_err());
    }

    #[test]
    fn relay_copies_both_ways() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut got = String::new();
            c.read_to_string(&mut got).unwrap();
            c.write_all(format!("echo:{got}").as_bytes()).unwrap();
        });
        let mut out = Vec::new();
        relay(&addr, std::io::Cursor::new(b"ping".to_vec()), &mut out).unwrap();
        server.join().unwrap();
        assert_eq!(out, b"echo:ping");
        assert!(relay("127.0.0.1:1", std::io::empty(), Vec::new()).is_err());
    }

    #[test]
    fn relay_passes_data_on_without_waiting_for_a_newline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            c.write_all(b"\x16\x03\x01 no newline").unwrap();
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
        });
        let (input_w, input_r) = std::os::unix::net::UnixStream::pair().unwrap();
        let (out_a, mut out_b) = std::os::unix::net::UnixStream::pair().unwrap();
        let r = std::thread::spawn(move || {
            relay(&addr, input_r, std::io::BufWriter::new(out_a)).unwrap();
        });
        out_b
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = [0u8; 14];
        out_b.read_exact(&mut got).expect("bytes arrive while open");
        assert_eq!(&got, b"\x16\x03\x01 no newline");
        drop(input_w);
        server.join().unwrap();
        r.join().unwrap();
    }

    fn pid_alive(pid: u32) -> bool {
        // a zombie counts as gone
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                let state = s.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z')
            })
            .unwrap_or(false)
    }

    /// The node life cycle with a stand-in for qemu (a shell that sleeps): files, process,
    /// deletion and drop.
    #[tokio::test]
    async fn node_lifecycle_with_a_fake_qemu() {
        if !have("genisoimage") || !have("qemu-img") {
            eprintln!("skipped: no genisoimage or qemu-img");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("base.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let fake = d.path().join("fake-qemu");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let settings = QemuSettings {
            image: img.clone(),
            format: None,
            memory_mib: 256,
            cpus: 1,
            accel: Accel::Tcg,
            work_dir: Some(d.path().join("nodes")),
            qemu: fake,
            qemu_img: "qemu-img".into(),
            ssh_keys: vec![],
            context: ContextVia::ConfigDrive,
        };
        let cloud =
            QemuCloud::new("iaas", settings, "/bin/cps".into(), d.path().join("unused")).unwrap();
        assert!(!cloud.uses_kvm());
        let req = || NodeRequest {
            vars: vars(),
            role: "node".into(),
            config: ConfigTree::locate().unwrap(),
        };
        let n1 = cloud.create_node(req()).await.unwrap();
        let n2 = cloud.create_node(req()).await.unwrap();
        assert_eq!((n1.id.as_str(), n2.id.as_str()), ("iaas1", "iaas2"));
        assert_eq!(n1.ip, "127.0.0.1");
        assert_ne!(n1.port, n2.port);
        let dir1 = d.path().join("nodes/1");
        for f in ["disk.qcow2", "config.iso", "qemu.pid", "qemu.args"] {
            assert!(dir1.join(f).exists(), "{f}");
        }
        let ud =
            std::fs::read_to_string(dir1.join("config-drive/openstack/latest/user_data")).unwrap();
        assert!(ud.contains("https://10.0.2.100:4443/enroll"));
        let args = std::fs::read_to_string(dir1.join("qemu.args")).unwrap();
        assert!(args.contains(&format!("hostfwd=tcp:127.0.0.1:{}-:5555", n1.port)));
        let pid = |dir: &Path| -> u32 {
            std::fs::read_to_string(dir.join("qemu.pid"))
                .unwrap()
                .parse()
                .unwrap()
        };
        let (p1, p2) = (pid(&dir1), pid(&d.path().join("nodes/2")));
        assert!(pid_alive(p1) && pid_alive(p2));
        assert_eq!(cloud.list_nodes().await.unwrap(), vec![n1.clone(), n2]);

        cloud.delete_node(&n1).await.unwrap();
        assert!(!pid_alive(p1), "deleted node's qemu is gone");
        assert!(!dir1.exists());
        assert!(pid_alive(p2));
        assert!(cloud.delete_node(&n1).await.is_err());
        assert_eq!(cloud.list_nodes().await.unwrap().len(), 1);

        drop(cloud);
        assert!(!pid_alive(p2), "drop kills the remaining VMs");
        assert!(!d.path().join("nodes/2").exists());
    }

    /// A creation abandoned half-way (the manager's task dropped) leaves no qemu and no files.
    #[tokio::test]
    async fn abandoned_creation_kills_its_qemu() {
        if !have("genisoimage") || !have("qemu-img") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("base.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let fake = d.path().join("fake-qemu");
        let pids = d.path().join("pids");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\necho $$ >> {}\nexec sleep 600\n", pids.display()),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let settings = QemuSettings {
            image: img,
            format: None,
            memory_mib: 256,
            cpus: 1,
            accel: Accel::Tcg,
            work_dir: Some(d.path().join("nodes")),
            qemu: fake,
            qemu_img: "qemu-img".into(),
            ssh_keys: vec![],
            context: ContextVia::ConfigDrive,
        };
        let cloud = QemuCloud::new("iaas", settings, "/bin/cps".into(), d.path().into()).unwrap();
        let req = NodeRequest {
            vars: vars(),
            role: "node".into(),
            config: ConfigTree::locate().unwrap(),
        };
        let mut fut = Box::pin(cloud.create_node(req));
        // until qemu has started (it is then in the start-up check)
        let t0 = Instant::now();
        // (The shell creates the file before it writes the pid: wait for the line.)
        let read_pid = || {
            std::fs::read_to_string(&pids)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
        };
        while read_pid().is_none() {
            assert!(t0.elapsed() < Duration::from_secs(20));
            let _ = tokio::time::timeout(Duration::from_millis(20), &mut fut).await;
        }
        let pid: u32 = read_pid().unwrap();
        assert!(pid_alive(pid));
        drop(fut);
        assert!(!pid_alive(pid), "abandoned qemu killed");
        assert!(!d.path().join("nodes/1").exists());
        assert!(cloud.list_nodes().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn qemu_that_exits_at_once_is_an_error() {
        if !have("genisoimage") || !have("qemu-img") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("base.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let settings = QemuSettings {
            image: img,
            format: Some("raw".into()),
            memory_mib: 256,
            cpus: 1,
            accel: Accel::Tcg,
            work_dir: Some(d.path().join("nodes")),
            qemu: "false".into(),
            qemu_img: "qemu-img".into(),
            ssh_keys: vec![],
            context: ContextVia::ConfigDrive,
        };
        let cloud = QemuCloud::new("iaas", settings, "/bin/cps".into(), d.path().into()).unwrap();
        let e = cloud
            .create_node(NodeRequest {
                vars: vars(),
                role: "node".into(),
                config: ConfigTree::locate().unwrap(),
            })
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("exited at once"), "{e:#}");
        assert!(!d.path().join("nodes/1").exists());
        assert!(cloud.list_nodes().await.unwrap().is_empty());
    }
}
