//! The service manager (service id 0): states, node management through the controller; the
//! service's own methods and hooks come from the registry (`crate::services`).
//!
//! States and preconditions (original `core/manager.py`):
//! * `startup` only from `INIT`/`STOPPED` → `PROLOGUE` → `RUNNING` (or `ERROR`);
//! * `add_nodes`/`remove_nodes` only in `RUNNING` → `ADAPTING` → `RUNNING` (or `ERROR`);
//! * `remove_nodes` must leave at least one node ("Requesting to delete N nodes while only M
//!   can be removed");
//! * `stop` from any state but `EPILOGUE` → `EPILOGUE` → `STOPPED` (it waits for a running
//!   operation to finish first).
//!
//! Every transition is recorded in the state log `{time, state, reason}`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::args::{is_dict, is_string, is_uploaded_file, Args};
use crate::cloud::{Cloud, Owner, ServiceNode};
use crate::cloudcfg::{valid_cloud_name, CloudEntry, CloudSettings, CloudSource, DriverKind};
use crate::config::Ini;
use crate::controller::{join_all, Controller};
use crate::expose;
use crate::rpc::{Exposed, Methods, Params, RpcError, RpcResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[allow(clippy::upper_case_acronyms)]
pub enum State {
    INIT,
    PROLOGUE,
    RUNNING,
    ADAPTING,
    EPILOGUE,
    STOPPED,
    ERROR,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct StateEntry {
    pub time: f64,
    pub state: State,
    pub reason: String,
}

pub const ROLE_NODE: &str = "node";

struct Inner {
    state: State,
    log: Vec<StateEntry>,
    nodes: Vec<ServiceNode>,
}

pub struct Manager {
    pub service_type: String,
    /// Nodes created by `startup` (`get_starting_nodes`; default 1).
    pub starting_nodes: std::sync::atomic::AtomicUsize,
    pub log_file: PathBuf,
    controller: Arc<Controller>,
    /// The service's half (registry entry of `service_type`).
    service: Arc<dyn crate::services::ManagerService>,
    inner: Mutex<Inner>,
    /// Held by every background operation: operations never overlap.
    ops: tokio::sync::Mutex<()>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Manager {
    pub fn new(service_type: &str, log_file: PathBuf, controller: Arc<Controller>) -> Arc<Self> {
        let m = Arc::new_cyclic(|me| Manager {
            service_type: service_type.to_string(),
            starting_nodes: std::sync::atomic::AtomicUsize::new(1),
            log_file,
            controller,
            service: crate::services::manager_service(
                service_type,
                crate::services::ManagerHandle(me.clone()),
            ),
            inner: Mutex::new(Inner {
                state: State::INIT,
                log: Vec::new(),
                nodes: Vec::new(),
            }),
            ops: tokio::sync::Mutex::new(()),
        });
        m.set_state(State::INIT, "Manager initialized");
        m
    }

    /// The state log (`get_service_history`).
    pub fn state_log(&self) -> Vec<StateEntry> {
        self.inner.lock().expect("state lock").log.clone()
    }

    /// Calls `method` on every node's agent concurrently (POST or GET); results in order.
    pub async fn call_nodes(
        &self,
        nodes: &[ServiceNode],
        post: bool,
        method: &str,
        params: &Value,
    ) -> Vec<(String, Result<Value, crate::client::ClientError>)> {
        let calls = nodes.iter().map(|n| async move {
            let c = self.controller.agent_client(n);
            let r = if post {
                c.post(0, method, params).await
            } else {
                c.get(0, method, params).await
            };
            (n.id.clone(), r)
        });
        join_all(calls).await
    }

    pub fn state(&self) -> State {
        self.inner.lock().expect("state lock").state
    }

    pub fn nodes(&self) -> Vec<ServiceNode> {
        self.inner.lock().expect("state lock").nodes.clone()
    }

    fn set_state(&self, s: State, reason: &str) {
        let mut i = self.inner.lock().expect("state lock");
        Self::record(&mut i, s, reason);
    }

    /// Sets the final state of a background operation unless `stop` took over meanwhile.
    fn finish_op(&self, during: State, s: State, reason: &str) {
        let mut i = self.inner.lock().expect("state lock");
        if i.state == during {
            Self::record(&mut i, s, reason);
        } else {
            tracing::info!("not moving to {s} ({reason}): state is now {}", i.state);
        }
    }

    fn record(i: &mut Inner, s: State, reason: &str) {
        tracing::info!("state {} -> {s}: {reason}", i.state);
        i.state = s;
        i.log.push(StateEntry {
            time: now(),
            state: s,
            reason: reason.to_string(),
        });
    }

    /// Atomically checks the precondition and moves to `to`.
    fn transition(
        &self,
        op: &str,
        from: &[State],
        to: State,
        reason: &str,
    ) -> Result<(), RpcError> {
        let mut i = self.inner.lock().expect("state lock");
        if !from.contains(&i.state) {
            let allowed: Vec<String> = from.iter().map(|s| s.to_string()).collect();
            return Err(RpcError(format!(
                "Wrong state to {op}: service is {} (must be {})",
                i.state,
                allowed.join(" or ")
            )));
        }
        Self::record(&mut i, to, reason);
        Ok(())
    }

    /// `check_node_roles`: role → count, `count` maps to the default role, sum > 0.
    fn check_node_roles(nodes: &Map<String, Value>) -> Result<usize, RpcError> {
        let mut total: i64 = 0;
        for (role, v) in nodes {
            if role != ROLE_NODE && role != "count" {
                return Err(RpcError(format!(
                    "Unknown role '{role}' (roles: {ROLE_NODE})"
                )));
            }
            let n = crate::args::is_int(v).map_err(|e| RpcError(format!("Role '{role}': {e}.")))?;
            if n < 0 {
                return Err(RpcError(format!(
                    "Role '{role}': negative number of nodes {n}."
                )));
            }
            total += n;
        }
        if total <= 0 {
            return Err(RpcError::new("The number of nodes must be greater than 0."));
        }
        Ok(total as usize)
    }

    fn check_cloud(&self, cloud: &str) -> Result<(), RpcError> {
        match self.controller.cloud_named(cloud) {
            Some(_) => Ok(()),
            None => {
                let msg = format!(
                    "Unknown cloud '{cloud}' (clouds: {})",
                    self.controller.cloud_names().join(", ")
                );
                // Refused before any state change; the log (and the status page) keep it.
                tracing::warn!("request refused: {msg}");
                Err(RpcError(msg))
            }
        }
    }

    /// Creates and starts `count` nodes; returns them and whether all went well.
    async fn grow(&self, count: usize, cloud: &str) -> (Vec<ServiceNode>, Option<String>) {
        let Some(cloud) = self.controller.cloud_named(cloud) else {
            return (
                Vec::new(),
                Some(format!(
                    "Unknown cloud '{cloud}' (clouds: {})",
                    self.controller.cloud_names().join(", ")
                )),
            );
        };
        let created = self
            .controller
            .create_nodes(cloud.as_ref(), count, ROLE_NODE)
            .await;
        let mut problem = None;
        if created.ready.len() < count {
            problem = Some(format!(
                "only {} of {count} node(s) started ({} never answered{})",
                created.ready.len(),
                created.failed.len(),
                if created.errors.is_empty() {
                    String::new()
                } else {
                    format!("; {}", created.errors.join("; "))
                }
            ));
        }
        // on_start / on_add_nodes: the service's hook (default: POST startup on each).
        if !created.ready.is_empty() {
            let mut all = self.nodes();
            all.extend(created.ready.iter().cloned());
            if let Err(e) = self
                .service
                .on_nodes_added(self, &created.ready, &all)
                .await
            {
                problem = Some(e);
            }
        }
        (created.ready, problem)
    }

    // ---- exposed methods ----

    async fn check_process(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        Ok(json!({}))
    }

    async fn get_service_info(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        Ok(json!({"state": self.state(), "type": self.service_type}))
    }

    async fn get_service_history(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        Ok(json!({"state_log": self.inner.lock().expect("state lock").log}))
    }

    async fn get_log(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        crate::agent::read_log(&self.log_file).await
    }

    async fn startup(self: &Arc<Self>, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let cloud = a.opt("cloud", is_string, "default".to_string())?;
        a.finish()?;
        self.check_cloud(&cloud)?;
        self.transition(
            "startup",
            &[State::INIT, State::STOPPED],
            State::PROLOGUE,
            "Starting up",
        )?;
        let me = self.clone();
        tokio::spawn(async move {
            let _op = me.ops.lock().await;
            let start = me.starting_nodes.load(std::sync::atomic::Ordering::SeqCst);
            let (nodes, problem) = me.grow(start, &cloud).await;
            let n = nodes.len();
            me.inner.lock().expect("state lock").nodes.extend(nodes);
            match problem {
                None => me.finish_op(
                    State::PROLOGUE,
                    State::RUNNING,
                    &format!("Started with {n} node(s)"),
                ),
                Some(p) => me.finish_op(
                    State::PROLOGUE,
                    State::ERROR,
                    &format!("Startup failed: {p}"),
                ),
            }
        });
        Ok(json!({"state": State::PROLOGUE}))
    }

    async fn add_nodes(self: &Arc<Self>, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let nodes = a.req("nodes", is_dict)?;
        let cloud = a.opt("cloud", is_string, "default".to_string())?;
        a.finish()?;
        let count = Self::check_node_roles(&nodes)?;
        self.check_cloud(&cloud)?;
        self.transition(
            "add_nodes",
            &[State::RUNNING],
            State::ADAPTING,
            &format!("Adding {count} node(s)"),
        )?;
        let me = self.clone();
        tokio::spawn(async move {
            let _op = me.ops.lock().await;
            let (nodes, problem) = me.grow(count, &cloud).await;
            let n = nodes.len();
            me.inner.lock().expect("state lock").nodes.extend(nodes);
            match problem {
                None => me.finish_op(
                    State::ADAPTING,
                    State::RUNNING,
                    &format!("Added {n} node(s)"),
                ),
                Some(p) => me.finish_op(
                    State::ADAPTING,
                    State::ERROR,
                    &format!("Adding nodes failed: {p}"),
                ),
            }
        });
        Ok(json!({"state": State::ADAPTING}))
    }

    async fn remove_nodes(self: &Arc<Self>, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let nodes = a.req("nodes", is_dict)?;
        a.finish()?;
        let count = Self::check_node_roles(&nodes)?;
        let to_remove = {
            let mut i = self.inner.lock().expect("state lock");
            if i.state != State::RUNNING {
                return Err(RpcError(format!(
                    "Wrong state to remove_nodes: service is {} (must be RUNNING)",
                    i.state
                )));
            }
            let removable = i.nodes.len().saturating_sub(1);
            if count > removable {
                return Err(RpcError(if removable == 0 {
                    format!("Requesting to delete {count} nodes while none can be removed")
                } else {
                    format!(
                        "Requesting to delete {count} nodes while only {removable} can be removed"
                    )
                }));
            }
            let keep = i.nodes.len() - count;
            let gone = i.nodes.split_off(keep);
            Self::record(
                &mut i,
                State::ADAPTING,
                &format!("Removing {count} node(s)"),
            );
            gone
        };
        let me = self.clone();
        tokio::spawn(async move {
            let _op = me.ops.lock().await;
            me.controller.delete_nodes(&to_remove).await;
            let remaining = me.nodes();
            if let Err(e) = me
                .service
                .on_nodes_removed(&me, &to_remove, &remaining)
                .await
            {
                tracing::warn!("after removing nodes: {e}");
            }
            me.set_state(
                State::RUNNING,
                &format!("Removed {} node(s)", to_remove.len()),
            );
        });
        Ok(json!({"state": State::ADAPTING}))
    }

    async fn stop(self: &Arc<Self>, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        self.transition(
            "stop",
            &[
                State::INIT,
                State::PROLOGUE,
                State::RUNNING,
                State::ADAPTING,
                State::STOPPED,
                State::ERROR,
            ],
            State::EPILOGUE,
            "Stopping",
        )?;
        let me = self.clone();
        tokio::spawn(async move {
            let _op = me.ops.lock().await;
            let nodes = std::mem::take(&mut me.inner.lock().expect("state lock").nodes);
            me.controller.delete_nodes(&nodes).await;
            me.set_state(
                State::STOPPED,
                &format!("Stopped ({} node(s) deleted)", nodes.len()),
            );
        });
        Ok(json!({"state": State::EPILOGUE}))
    }

    async fn list_nodes(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        let i = self.inner.lock().expect("state lock");
        if !matches!(i.state, State::RUNNING | State::ADAPTING) {
            return Ok(json!({}));
        }
        let ids: Vec<&str> = i.nodes.iter().map(|n| n.id.as_str()).collect();
        let mut m = BTreeMap::new();
        m.insert(self.service_type.clone(), ids);
        Ok(json!(m))
    }

    fn find_node(&self, id: &str) -> Result<ServiceNode, RpcError> {
        self.inner
            .lock()
            .expect("state lock")
            .nodes
            .iter()
            .find(|n| n.id == id)
            .cloned()
            .ok_or_else(|| RpcError(format!("Invalid node id '{id}'")))
    }

    async fn get_node_info(&self, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let id = a.req("serviceNodeId", is_string)?;
        a.finish()?;
        let n = self.find_node(&id)?;
        Ok(json!({"serviceNode": {
            "id": n.id, "ip": n.ip, "vmid": n.vmid, "cloud": n.cloud, "role": n.role, "port": n.port,
            "logs": [{"filename": "agent.log", "description": "Agent log"}]
        }}))
    }

    async fn get_agent_log(&self, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let id = a.req("agentId", is_string)?;
        a.finish()?;
        let n = self.find_node(&id)?;
        self.controller
            .agent_client(&n)
            .get(0, "get_log", &json!({}))
            .await
            .map_err(|e| RpcError(e.to_string()))
    }

    /// UPLOAD: the user's startup script, put into the context of nodes created from now on.
    async fn upload_startup_script(&self, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let (filename, content) = a.req("script", is_uploaded_file)?;
        a.finish()?;
        *self.controller.startup_script.lock().expect("script lock") = Some(content);
        Ok(json!({"filename": filename}))
    }

    async fn get_startup_script(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        match self
            .controller
            .startup_script
            .lock()
            .expect("script lock")
            .clone()
        {
            Some(s) => Ok(json!(s)),
            None => Err(RpcError::new("No startup script")),
        }
    }

    /// Deletes every node (shutdown).
    pub async fn shutdown(&self) {
        let nodes = std::mem::take(&mut self.inner.lock().expect("state lock").nodes);
        self.controller.delete_nodes(&nodes).await;
    }
}

impl Exposed for Manager {
    fn expose(self: Arc<Self>, m: &mut Methods) {
        expose!(m, self, {
            GET check_process, GET get_service_info, GET get_service_history, GET get_log,
            GET list_nodes, GET get_node_info, GET get_agent_log,
            POST startup, POST add_nodes, POST remove_nodes, POST stop,
            UPLOAD upload_startup_script, GET get_startup_script,
        });
        self.service.clone().expose(m);
    }
}

/// `[manager]` settings.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub service_type: String,
    pub deployment_name: String,
    pub user_id: u64,
    pub app_id: u64,
    pub service_id: u64,
    pub my_ip: String,
    pub bind: String,
    pub port: u16,
    pub enroll_port: u16,
    pub log_file: PathBuf,
    pub cert_dir: PathBuf,
    pub ca_dir: PathBuf,
    pub var_run: PathBuf,
    pub var_cache: PathBuf,
    pub config_dir: Option<PathBuf>,
    /// Every cloud; the first is the default one (`CLOUD`, `CLOUD_NAME`, `CLOUD_CONFIG`), the
    /// others come from `OTHER_CLOUDS`.
    pub clouds: Vec<CloudEntry>,
    /// Tag marking this manager's nodes in remote clouds (`MANAGER_ID`).
    pub manager_id: String,
    pub agent_port: u16,
    pub poll: Duration,
    pub boot_timeout: Duration,
    pub max_retries: u32,
    pub token_ttl: Duration,
    pub cps_bin: Option<PathBuf>,
    pub local_dead_nodes: u32,
    /// A one-time enrolment token for a user certificate (node id `user`), valid
    /// for a day: how a Nutshell's owner gets a certificate without any private key
    /// travelling in user-data.
    pub user_token: Option<String>,
    /// `CLOUD = nspawn`: the root tree agents run on, with `systemd-nspawn`.
    pub nspawn_rootfs: Option<PathBuf>,
    pub starting_nodes: usize,
    pub replacements: BTreeMap<String, String>,
    /// Read-only HTML status page on 127.0.0.1 (`STATUS_PORT`; none = off, 0 = ephemeral).
    pub status_port: Option<u16>,
    /// `[qemu]` section (the `qemu` driver).
    pub qemu: Option<crate::qemu::QemuSettings>,
}

/// The source of one cloud from a section's `CLOUD` (driver) and `CLOUD_CONFIG` (file).
fn cloud_source(ini: &Ini, section: &str, default_driver: Option<&str>) -> Result<CloudSource> {
    let line = |k: &str| {
        ini.key_line(section, k)
            .or_else(|| ini.section_line(section))
            .map(|l| format!("line {l}: "))
            .unwrap_or_default()
    };
    let driver = ini
        .get(section, "CLOUD")
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty());
    let file = ini
        .get(section, "CLOUD_CONFIG")
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty());
    let driver = driver.or_else(|| {
        if file.is_some() {
            None
        } else {
            default_driver.map(str::to_string)
        }
    });
    match (driver.as_deref(), file) {
        (Some("local"), None) => Ok(CloudSource::Local),
        (Some("qemu"), None) => Ok(CloudSource::Qemu),
        (Some("nspawn"), None) => Ok(CloudSource::Nspawn),
        (Some(d @ ("local" | "qemu" | "nspawn")), Some(_)) => bail!(
            "{}[{section}] CLOUD_CONFIG is for ec2 and openstack clouds, not CLOUD = {d}",
            line("CLOUD_CONFIG")
        ),
        (Some(d), file) => {
            let Some(kind) = DriverKind::parse(d) else {
                bail!(
                    "{}[{section}] CLOUD = '{d}': expected local, nspawn, qemu, ec2 or openstack",
                    line("CLOUD")
                );
            };
            let Some(path) = file else {
                bail!(
                    "{}[{section}] CLOUD = {d} needs CLOUD_CONFIG, a cloud cfg file (see config/cloud/{d}.cfg)",
                    line("CLOUD")
                );
            };
            Ok(CloudSource::File {
                path: path.into(),
                driver: Some(kind),
            })
        }
        (None, Some(path)) => Ok(CloudSource::File {
            path: path.into(),
            driver: None,
        }),
        (None, None) => bail!(
            "{}[{section}] names no cloud: set CLOUD (local, qemu) or CLOUD_CONFIG (a cloud cfg file)",
            line("CLOUD")
        ),
    }
}

/// `[manager] CLOUD/CLOUD_NAME/CLOUD_CONFIG` (the default cloud) and one section per name in
/// `[manager] OTHER_CLOUDS`, each with `CLOUD` and/or `CLOUD_CONFIG`.
pub fn cloud_entries(ini: &Ini) -> Result<Vec<CloudEntry>> {
    const S: &str = "manager";
    let default_name = ini.get_or(S, "CLOUD_NAME", "iaas");
    if !valid_cloud_name(&default_name) {
        bail!("[manager] CLOUD_NAME = '{default_name}': letters, digits, '-' and '_' only, not 'default'");
    }
    let mut out = vec![CloudEntry {
        name: default_name,
        source: cloud_source(ini, S, Some("local"))?,
    }];
    let others = ini.get_or(S, "OTHER_CLOUDS", "");
    for name in others
        .split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        if !valid_cloud_name(name) {
            bail!("[manager] OTHER_CLOUDS: '{name}' is no valid cloud name (letters, digits, '-' and '_', not 'default')");
        }
        if out.iter().any(|e| e.name == name) {
            bail!("[manager] OTHER_CLOUDS: cloud '{name}' is named twice (or is CLOUD_NAME)");
        }
        if !ini.has_section(name) {
            bail!("[manager] OTHER_CLOUDS names '{name}', but there is no [{name}] section (with CLOUD and/or CLOUD_CONFIG)");
        }
        out.push(CloudEntry {
            name: name.to_string(),
            source: cloud_source(ini, name, None)?,
        });
    }
    Ok(out)
}

fn secs(s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s).map_err(|e| anyhow::anyhow!("bad duration {s}: {e}"))
}

impl ManagerConfig {
    pub fn from_ini(ini: &Ini) -> Result<Self> {
        const S: &str = "manager";
        for k in ["LOG_FILE", "CERT_DIR", "VAR_RUN", "VAR_CACHE"] {
            ini.require(S, k)?;
        }
        let opt = |k: &str| ini.get(S, k).filter(|v| !v.is_empty());
        let service_type = ini.get_or(S, "TYPE", "helloworld");
        let replacements = (crate::services::require(&service_type)?.replacements)(ini);
        let cert_dir: PathBuf = ini.require(S, "CERT_DIR")?.into();
        Ok(ManagerConfig {
            service_type,
            deployment_name: ini.get_or(S, "DEPLOYMENT_NAME", "conpaas"),
            user_id: ini.require(S, "USER_ID")?.parse().context("USER_ID")?,
            app_id: ini.require(S, "APP_ID")?.parse().context("APP_ID")?,
            service_id: ini.parse_or(S, "SERVICE_ID", 1)?,
            my_ip: ini.get_or(S, "MY_IP", "127.0.0.1"),
            bind: ini.get_or(S, "BIND", "0.0.0.0"),
            port: ini.parse_or(S, "PORT", 443)?,
            enroll_port: ini.parse_or(S, "ENROLL_PORT", 4443)?,
            log_file: ini.require(S, "LOG_FILE")?.into(),
            ca_dir: opt("CA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| cert_dir.clone()),
            cert_dir,
            var_run: ini.require(S, "VAR_RUN")?.into(),
            var_cache: ini.require(S, "VAR_CACHE")?.into(),
            config_dir: opt("CONFIG_DIR").map(PathBuf::from),
            clouds: cloud_entries(ini)?,
            manager_id: opt("MANAGER_ID").unwrap_or_else(|| {
                format!(
                    "{}-u{}-a{}-s{}",
                    ini.get_or(S, "DEPLOYMENT_NAME", "conpaas"),
                    ini.get_or(S, "USER_ID", ""),
                    ini.get_or(S, "APP_ID", ""),
                    ini.get_or(S, "SERVICE_ID", "1")
                )
            }),
            agent_port: ini.parse_or(S, "AGENT_PORT", 5555)?,
            poll: secs(ini.parse_or(S, "POLL_INTERVAL", 5.0)?)?,
            boot_timeout: secs(ini.parse_or(S, "BOOT_TIMEOUT", 300.0)?)?,
            max_retries: ini.parse_or(S, "MAX_RETRIES", 2)?,
            token_ttl: secs(ini.parse_or(S, "TOKEN_TTL", 900.0)?)?,
            cps_bin: opt("CPS_BIN").map(PathBuf::from),
            local_dead_nodes: ini.parse_or(S, "LOCAL_DEAD_NODES", 0)?,
            user_token: opt("USER_TOKEN").map(|t| t.to_string()),
            nspawn_rootfs: opt("NSPAWN_ROOTFS").map(PathBuf::from),
            starting_nodes: ini.parse_or(S, "STARTING_NODES", 1)?,
            replacements,
            status_port: ini
                .get(S, "STATUS_PORT")
                .filter(|v| !v.is_empty())
                .map(|v| v.parse().context("STATUS_PORT"))
                .transpose()?,
            qemu: crate::qemu::QemuSettings::from_ini(ini)?,
        })
    }
}

/// A running manager: RPC and enrolment listeners plus the objects behind them.
pub struct Running {
    pub manager: Arc<Manager>,
    pub rpc_addr: std::net::SocketAddr,
    pub enroll_addr: std::net::SocketAddr,
    /// The `local` clouds (their agents are killed when the manager exits).
    pub local_clouds: Vec<Arc<crate::cloud::LocalCloud>>,
}

/// Builds the driver of one cloud.
async fn build_cloud(
    cfg: &ManagerConfig,
    entry: &CloudEntry,
    config_dir: &std::path::Path,
    owner: &Owner,
    local_clouds: &mut Vec<Arc<crate::cloud::LocalCloud>>,
) -> Result<Arc<dyn Cloud>> {
    let cps_bin = || match &cfg.cps_bin {
        Some(b) => Ok(b.clone()),
        None => std::env::current_exe(),
    };
    // The default cloud keeps the directories it always had; the others get their own.
    let is_default = cfg.clouds.first().map(|e| &e.name) == Some(&entry.name);
    let sub = |base: &str| {
        if is_default {
            cfg.var_cache.join(base)
        } else {
            cfg.var_cache.join(format!("{base}-{}", entry.name))
        }
    };
    match &entry.source {
        CloudSource::Local => {
            let c = Arc::new(crate::cloud::LocalCloud::new(
                &entry.name,
                cps_bin()?,
                sub("local-nodes"),
                cfg.local_dead_nodes,
            )?);
            local_clouds.push(c.clone());
            Ok(c)
        }
        CloudSource::Nspawn => {
            let rootfs = cfg
                .nspawn_rootfs
                .clone()
                .context("CLOUD = nspawn needs NSPAWN_ROOTFS (the agents' root tree)")?;
            let c = Arc::new(
                crate::cloud::LocalCloud::new(
                    &entry.name,
                    "/usr/local/bin/cps".into(),
                    sub("nspawn-nodes"),
                    0,
                )?
                .in_containers(rootfs),
            );
            local_clouds.push(c.clone());
            Ok(c)
        }
        CloudSource::Qemu => {
            let settings = cfg
                .qemu
                .clone()
                .context("a qemu cloud needs a [qemu] section")?;
            Ok(Arc::new(crate::qemu::QemuCloud::new(
                &entry.name,
                settings,
                cps_bin()?,
                sub("qemu-nodes"),
            )?))
        }
        CloudSource::File { path, driver } => {
            let path = crate::cloudcfg::resolve(path, config_dir);
            let settings = crate::cloudcfg::load_cloud(&path, &entry.name, *driver)?;
            remote_cloud(&entry.name, settings, owner.clone()).await
        }
    }
}

#[cfg(feature = "clouds")]
async fn remote_cloud(name: &str, settings: CloudSettings, owner: Owner) -> Result<Arc<dyn Cloud>> {
    Ok(match settings {
        CloudSettings::Ec2(s) => Arc::new(crate::ec2::Ec2Cloud::new(name, s, owner).await?),
        CloudSettings::OpenStack(s) => {
            Arc::new(crate::openstack::OpenStackCloud::new(name, s, owner)?)
        }
    })
}

#[cfg(not(feature = "clouds"))]
async fn remote_cloud(
    name: &str,
    settings: CloudSettings,
    _owner: Owner,
) -> Result<Arc<dyn Cloud>> {
    bail!(
        "cloud {name}: this cps was built without the `clouds` feature, so the {} driver is not available",
        settings.kind().as_str()
    )
}

/// Builds the manager from its config and starts serving (in background tasks).
pub async fn start(cfg: &ManagerConfig) -> Result<Running> {
    use crate::pki::{self, CertPaths, PeerRule, Role};
    std::fs::create_dir_all(&cfg.var_run)?;
    let certs = CertPaths::in_dir(&cfg.cert_dir);
    let ca = pki::Ca::load(&cfg.ca_dir)
        .context("the manager needs the CA (CA_DIR) to enrol its nodes")?;
    let enroller = Arc::new(crate::enrol::Enroller::new(ca, cfg.token_ttl, 365));
    if let Some(t) = &cfg.user_token {
        enroller.add_token(
            t,
            "user",
            pki::Identity {
                role: Role::User,
                uid: cfg.user_id,
                app: cfg.app_id,
            },
            std::time::Duration::from_secs(24 * 3600),
        );
    }
    let config = match &cfg.config_dir {
        Some(d) => crate::context::ConfigTree::new(d),
        None => crate::context::ConfigTree::locate()?,
    };
    let owner = Owner {
        manager_id: cfg.manager_id.clone(),
        name_prefix: format!(
            "{}-u{}-a{}-s{}-",
            cfg.deployment_name, cfg.user_id, cfg.app_id, cfg.service_id
        ),
    };
    let mut local_clouds = Vec::new();
    let mut clouds = Vec::new();
    for entry in &cfg.clouds {
        let c = build_cloud(cfg, entry, &config.dir, &owner, &mut local_clouds)
            .await
            .with_context(|| format!("cloud '{}'", entry.name))?;
        clouds.push(c);
    }
    let cloud = clouds.remove(0);
    let rpc_listener = tokio::net::TcpListener::bind((cfg.bind.as_str(), cfg.port))
        .await
        .with_context(|| format!("binding {}:{}", cfg.bind, cfg.port))?;
    let enroll_listener = tokio::net::TcpListener::bind((cfg.bind.as_str(), cfg.enroll_port))
        .await
        .with_context(|| format!("binding {}:{}", cfg.bind, cfg.enroll_port))?;
    let rpc_addr = rpc_listener.local_addr()?;
    let enroll_addr = enroll_listener.local_addr()?;
    let base_vars = crate::context::NodeVars {
        role: Role::Agent,
        service_type: cfg.service_type.clone(),
        deployment_name: cfg.deployment_name.clone(),
        user_id: cfg.user_id,
        app_id: cfg.app_id,
        service_id: cfg.service_id,
        node_id: String::new(),
        manager_ip: cfg.my_ip.clone(),
        enroll_url: format!("https://{}:{}/enroll", cfg.my_ip, enroll_addr.port()),
        token: String::new(),
        ca_cert_pem: enroller.ca_cert_pem().to_string(),
        port: cfg.agent_port,
        replacements: cfg.replacements.clone(),
        startup_script: None,
    };
    let agent_rule = PeerRule {
        roles: vec![Role::Agent, Role::Manager],
        uid: cfg.user_id,
        app: Some(cfg.app_id),
    };
    let controller = Arc::new(Controller {
        cloud,
        other_clouds: clouds,
        config,
        enroller: enroller.clone(),
        agent_tls: pki::client_config(&certs, agent_rule)?,
        base_vars,
        poll: cfg.poll,
        boot_timeout: cfg.boot_timeout,
        max_retries: cfg.max_retries,
        startup_script: std::sync::Mutex::new(None),
    });
    // Nodes tagged by this manager that it does not know: from an earlier run.
    for (cloud, vmid) in controller.reap_orphans(&[]).await {
        tracing::warn!("deleted orphan node {vmid} in cloud {cloud}");
    }
    let manager = Manager::new(&cfg.service_type, cfg.log_file.clone(), controller);
    manager
        .starting_nodes
        .store(cfg.starting_nodes, std::sync::atomic::Ordering::SeqCst);
    let mut d = crate::rpc::Dispatcher::new();
    d.add_service(0, manager.clone());
    let tls = pki::server_config(&certs, PeerRule::manager_server(cfg.user_id, cfg.app_id))?;
    tokio::spawn(crate::rpc::serve_tls(rpc_listener, tls, d.router()));
    let etls = pki::enrol_server_config(&certs)?;
    tokio::spawn(crate::rpc::serve_tls(
        enroll_listener,
        etls,
        enroller.router(),
    ));
    let mut ports = json!({"port": rpc_addr.port(), "enroll_port": enroll_addr.port()});
    if let Some(port) = cfg.status_port {
        let addr = crate::status::serve(manager.clone(), port).await?;
        ports["status_port"] = json!(addr.port());
    }
    pki::write_file(&cfg.var_run.join("ports.json"), &ports.to_string(), 0o644)?;
    tracing::info!("manager listening on {rpc_addr} (enrolment on {enroll_addr})");
    Ok(Running {
        manager,
        rpc_addr,
        enroll_addr,
        local_clouds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(text: &str) -> Result<Vec<CloudEntry>> {
        cloud_entries(&Ini::parse(text).unwrap())
    }

    #[test]
    fn default_cloud_and_other_clouds() {
        // Nothing said: the local cloud named iaas.
        assert_eq!(
            entries("[manager]\n").unwrap(),
            vec![CloudEntry {
                name: "iaas".into(),
                source: CloudSource::Local
            }]
        );
        let e = entries(
            "[manager]\nCLOUD = ec2\nCLOUD_CONFIG = cloud/ec2.cfg\n\
             OTHER_CLOUDS = mystack, lab ,vms\n\
             [mystack]\nCLOUD_CONFIG = /etc/cps/openstack.cfg\n\
             [lab]\nCLOUD = local\n[vms]\nCLOUD = qemu\n",
        )
        .unwrap();
        let names: Vec<&str> = e.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["iaas", "mystack", "lab", "vms"]);
        assert_eq!(
            e[0].source,
            CloudSource::File {
                path: "cloud/ec2.cfg".into(),
                driver: Some(DriverKind::Ec2)
            }
        );
        assert_eq!(
            e[1].source,
            CloudSource::File {
                path: "/etc/cps/openstack.cfg".into(),
                driver: None
            }
        );
        assert_eq!(
            (&e[2].source, &e[3].source),
            (&CloudSource::Local, &CloudSource::Qemu)
        );
        // CLOUD_CONFIG alone: the file's DRIVER decides.
        let e = entries("[manager]\nCLOUD_NAME = aws\nCLOUD_CONFIG = ec2.cfg\n").unwrap();
        assert_eq!(e[0].name, "aws");
        assert!(matches!(
            e[0].source,
            CloudSource::File { driver: None, .. }
        ));
    }

    #[test]
    fn cloud_config_errors() {
        let err = |t: &str| entries(t).unwrap_err().to_string();
        let e = err("[manager]\nUSER_ID = 1\nCLOUD = openstack\n");
        assert!(
            e.contains("line 3") && e.contains("needs CLOUD_CONFIG"),
            "{e}"
        );
        let e = err("[manager]\nCLOUD = azure\n");
        assert!(e.contains("line 2") && e.contains("'azure'"), "{e}");
        let e = err("[manager]\nOTHER_CLOUDS = aws\n");
        assert!(e.contains("no [aws] section"), "{e}");
        let e = err("[manager]\nOTHER_CLOUDS = aws\n[aws]\nKEY = 1\n");
        assert!(
            e.contains("line 3") && e.contains("[aws] names no cloud"),
            "{e}"
        );
        let e = err("[manager]\nOTHER_CLOUDS = iaas\n[iaas]\nCLOUD = local\n");
        assert!(e.contains("named twice"), "{e}");
        let e = err("[manager]\nOTHER_CLOUDS = default\n");
        assert!(e.contains("'default' is no valid cloud name"), "{e}");
        let e = err("[manager]\nOTHER_CLOUDS = l\n[l]\nCLOUD = local\nCLOUD_CONFIG = x.cfg\n");
        assert!(
            e.contains("line 5") && e.contains("not CLOUD = local"),
            "{e}"
        );
    }

    #[test]
    fn manager_id_defaults_to_the_node_name_prefix() {
        let ini = Ini::parse(
            "[manager]\nUSER_ID = 3\nAPP_ID = 7\nDEPLOYMENT_NAME = dep\nLOG_FILE = /l\n\
             CERT_DIR = /c\nVAR_RUN = /r\nVAR_CACHE = /v\n",
        )
        .unwrap();
        assert_eq!(
            ManagerConfig::from_ini(&ini).unwrap().manager_id,
            "dep-u3-a7-s1"
        );
        let mut ini = ini;
        ini.set("manager", "MANAGER_ID", "mgr-42");
        assert_eq!(ManagerConfig::from_ini(&ini).unwrap().manager_id, "mgr-42");
    }
}
