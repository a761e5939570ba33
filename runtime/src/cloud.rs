//! Cloud drivers. `local` runs agents as local processes (the `cps` binary itself) on
//! 127.0.0.1, and `nspawn` (the same driver) runs them in `systemd-nspawn` containers
//! on a root tree, as a Nutshell does; `qemu` (`crate::qemu`), `ec2` (`crate::ec2`) and
//! `openstack` (`crate::openstack`) implement the same trait.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::context::{ConfigTree, NodePaths, NodeVars};
use crate::pki;

/// A node (VM or process) of the service. `id` is `<cloud name><vmid>` as in the original.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceNode {
    pub id: String,
    pub name: String,
    pub vmid: String,
    pub ip: String,
    pub private_ip: String,
    pub cloud: String,
    pub role: String,
    pub port: u16,
}

impl ServiceNode {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

/// What a driver gets to create one node: the node's context variables (with its one-time
/// enrolment token) and the config tree to render the contextualization from.
pub struct NodeRequest {
    pub vars: NodeVars,
    pub role: String,
    pub config: ConfigTree,
}

#[async_trait]
pub trait Cloud: Send + Sync {
    /// Prefix of node ids (`iaas` for the default cloud).
    fn cloud_name(&self) -> &str;
    /// Driver type (`local`, `qemu`, `ec2`, `openstack`): selects the cloud script.
    fn cloud_type(&self) -> &str;
    /// Starts a node booting with the given context. Returns as soon as the node exists;
    /// readiness is polled by the controller.
    async fn create_node(&self, req: NodeRequest) -> Result<ServiceNode>;
    async fn delete_node(&self, node: &ServiceNode) -> Result<()>;
    async fn list_nodes(&self) -> Result<Vec<ServiceNode>>;
    /// Deletes the nodes this manager owns in the cloud (by its tag) that are not in `known`:
    /// left behind by an earlier run of the manager. Returns their vmids. Drivers whose nodes
    /// cannot outlive the manager have none.
    async fn reap_orphans(&self, known: &[ServiceNode]) -> Result<Vec<String>> {
        let _ = known;
        Ok(Vec::new())
    }
}

/// What a remote driver needs to know about the manager that owns its nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Tag value marking the manager's nodes (`MANAGER_ID`); stable across restarts.
    pub manager_id: String,
    /// Common prefix of the manager's node names (`<deployment>-u<uid>-a<aid>-s<sid>-`).
    pub name_prefix: String,
}

/// Tag (EC2) and metadata (OpenStack) keys put on every node.
pub mod tags {
    pub const MANAGER: &str = "cps-manager";
    pub const CLOUD: &str = "cps-cloud";
    pub const NODE: &str = "cps-node";
    pub const ROLE: &str = "cps-role";
    pub const USER: &str = "cps-user";
    pub const APP: &str = "cps-app";
    pub const SERVICE: &str = "cps-service";
}

/// The tags of a node: manager, cloud, node name, role, user, application, service.
pub fn node_tags(owner: &Owner, cloud: &str, req: &NodeRequest) -> Vec<(&'static str, String)> {
    vec![
        (tags::MANAGER, owner.manager_id.clone()),
        (tags::CLOUD, cloud.to_string()),
        (tags::NODE, req.vars.node_id.clone()),
        (tags::ROLE, req.role.clone()),
        (tags::USER, req.vars.user_id.to_string()),
        (tags::APP, req.vars.app_id.to_string()),
        (tags::SERVICE, req.vars.service_id.to_string()),
    ]
}

/// User-data as the clouds take it: base64, gzip-compressed first when the script is larger
/// than `limit` bytes (the image's `cps context apply` unpacks gzip).
pub fn encode_user_data(script: &str, limit: usize) -> Result<String> {
    use base64::Engine;
    use std::io::Write;
    let b64 = base64::engine::general_purpose::STANDARD;
    if script.len() <= limit {
        return Ok(b64.encode(script));
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(script.as_bytes())?;
    let data = gz.finish()?;
    if data.len() > limit {
        bail!(
            "user-data is {} bytes gzip-compressed; the cloud takes at most {limit}",
            data.len()
        );
    }
    Ok(b64.encode(data))
}

/// Agents as local processes.
pub struct LocalCloud {
    name: String,
    bin: PathBuf,
    work_dir: PathBuf,
    next_vmid: AtomicU64,
    /// Test aid: this many of the next nodes are started dead (they accept TCP and never answer).
    dead_nodes: AtomicU32,
    children: Mutex<HashMap<String, (ServiceNode, tokio::process::Child)>>,
    /// `Some(rootfs)`: each node runs in a `systemd-nspawn` container on this tree
    /// (the `nspawn` driver of a Nutshell); `None`: as a plain process.
    container_root: Option<PathBuf>,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl LocalCloud {
    pub fn new(name: &str, bin: PathBuf, work_dir: PathBuf, dead_nodes: u32) -> Result<Self> {
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("creating {}", work_dir.display()))?;
        Ok(LocalCloud {
            name: name.to_string(),
            bin,
            work_dir,
            next_vmid: AtomicU64::new(1),
            dead_nodes: AtomicU32::new(dead_nodes),
            children: Mutex::new(HashMap::new()),
            container_root: None,
        })
    }

    /// Runs nodes as containers on `rootfs` (read-only, with a tmpfs overlay for
    /// writes: `--volatile=overlay`), sharing the host's network. The node's
    /// directory is bound at the same path inside, so its config names the same
    /// files on both sides; `bin` is the runtime's path inside the tree.
    pub fn in_containers(mut self, rootfs: PathBuf) -> Self {
        self.container_root = Some(rootfs);
        self
    }

    fn driver(&self) -> &'static str {
        if self.container_root.is_some() {
            "nspawn"
        } else {
            "local"
        }
    }

    fn take_dead(&self) -> bool {
        self.dead_nodes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Kills every node (manager shutdown).
    pub fn kill_all(&self) {
        let mut c = self.children.lock().expect("children lock");
        for (_, (_, child)) in c.iter_mut() {
            let _ = child.start_kill();
        }
        c.clear();
    }
}

impl Drop for LocalCloud {
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[async_trait]
impl Cloud for LocalCloud {
    fn cloud_name(&self) -> &str {
        &self.name
    }
    fn cloud_type(&self) -> &str {
        self.driver()
    }

    async fn create_node(&self, mut req: NodeRequest) -> Result<ServiceNode> {
        let vmid = self.next_vmid.fetch_add(1, Ordering::SeqCst).to_string();
        let dir = self.work_dir.join(&vmid);
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        req.vars.port = port;
        let paths = NodePaths::under(&dir, req.vars.role);
        paths.create_dirs()?;
        pki::write_file(
            &PathBuf::from(&paths.cert_dir).join(pki::CA_CERT_FILE),
            &req.vars.ca_cert_pem,
            0o644,
        )?;
        let cfg_path = dir.join("config.cfg");
        std::fs::write(&cfg_path, req.config.render_config(&req.vars, &paths)?)?;
        // The VM user-data this node would get, kept for inspection.
        std::fs::write(
            dir.join("context.sh"),
            req.config.render_script(&req.vars, "local")?,
        )?;
        let dead = self.take_dead();
        let mut cmd = match &self.container_root {
            None => tokio::process::Command::new(&self.bin),
            Some(root) => {
                let mut c = tokio::process::Command::new("systemd-nspawn");
                // --keep-unit: stay in the manager's own unit (or process tree) rather
                // than asking a system bus for a scope; there may be no bus at all.
                c.args([
                    "--quiet",
                    "--register=no",
                    "--keep-unit",
                    "--volatile=overlay",
                    "--as-pid2",
                ])
                .arg(format!("--machine={}{}", self.name, vmid))
                .arg("--directory")
                .arg(root)
                .arg(format!("--bind={}", dir.display()))
                .arg("--")
                .arg(&self.bin);
                c
            }
        };
        if dead {
            cmd.arg("dead-node").arg("--port").arg(port.to_string());
        } else {
            cmd.arg(req.vars.role.as_str()).arg("-c").arg(&cfg_path);
        }
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("out.log"))?)
            .stderr(std::fs::File::create(dir.join("err.log"))?)
            .kill_on_drop(true);
        // Die with the manager, whatever way it ends.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let pid = child.id().unwrap_or(0);
        std::fs::write(dir.join("pid"), pid.to_string())?;
        let node = ServiceNode {
            id: format!("{}{}", self.name, vmid),
            name: req.vars.node_id.clone(),
            vmid: vmid.clone(),
            ip: "127.0.0.1".into(),
            private_ip: "127.0.0.1".into(),
            cloud: self.name.clone(),
            role: req.role,
            port,
        };
        tracing::info!(
            "{} cloud: started node {} (pid {pid}, port {port}{})",
            self.driver(),
            node.id,
            if dead { ", dead" } else { "" }
        );
        self.children
            .lock()
            .expect("children lock")
            .insert(vmid, (node.clone(), child));
        Ok(node)
    }

    async fn delete_node(&self, node: &ServiceNode) -> Result<()> {
        let entry = self
            .children
            .lock()
            .expect("children lock")
            .remove(&node.vmid);
        let Some((_, mut child)) = entry else {
            bail!("no such node {}", node.id);
        };
        if self.container_root.is_some() {
            // On SIGTERM nspawn asks its stub init (pid 1, --as-pid2) to stop the
            // container and tears it down; give it a moment.
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
            }
        } else {
            let _ = child.start_kill();
        }
        let _ = child.wait().await;
        let _ = std::fs::write(self.work_dir.join(&node.vmid).join("deleted"), "");
        tracing::info!("local cloud: deleted node {}", node.id);
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<ServiceNode>> {
        let c = self.children.lock().expect("children lock");
        let mut v: Vec<_> = c.values().map(|(n, _)| n.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }
}
