//! The Generic service: runs the application's own lifecycle scripts on every node.
//!
//! The user uploads an archive (`.tar.gz`, `.tar` or `.zip`) to the manager
//! (`upload_code_version`); the enabled version is sent to every agent, which unpacks it safely
//! (see [`super::archive`]) under `CODE_DIR/<codeVersionId>` and runs, as the unprivileged
//! `SCRIPT_USER` (default `nobody`), from that directory:
//!
//! | script | when |
//! | --- | --- |
//! | `init.sh` | on a new node, once the code is there (and on every node by `enable_code`) |
//! | `notify.sh` | on every node when nodes joined or left |
//! | `run.sh`, `interrupt.sh`, `cleanup.sh` | on request (`execute_script`) |
//!
//! Missing scripts are skipped. Every script gets `CONPAAS_NODES` (node ids, space separated),
//! `CONPAAS_NODE_IPS`, `CONPAAS_NODES_FILE` (one `id ip` line per node), `CONPAAS_NODE_ID`,
//! `CONPAAS_CODE_DIR`; output (stdout and stderr) goes to `CODE_DIR/logs/<script>.log` and the
//! tail of the last run is in `get_script_status`. `init.sh`, `notify.sh` and `cleanup.sh` run
//! one at a time in the order they were requested; `run.sh` and `interrupt.sh` run at once, and
//! `interrupt.sh` stops a running `run.sh` (SIGTERM to its process group) when it finishes.
//!
//! Method names follow the original Generic service: manager `upload_code_version`,
//! `list_code_versions`, `enable_code`, `execute_script`, `get_script_status`; agent
//! `update_code`, `run_script`, `get_script_status`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{archive, AgentService, ManagerHandle, ManagerService, ServiceDef};
use crate::agent::AgentConfig;
use crate::args::{is_list, is_string, is_uploaded_bytes, Args};
use crate::cloud::ServiceNode;
use crate::config::Ini;
use crate::expose;
use crate::manager::{Manager, State};
use crate::rpc::{Methods, Params, RpcError, RpcResult};

pub const SERVICE: ServiceDef = ServiceDef {
    name: "generic",
    replacements: super::no_replacements,
    agent: |cfg: &AgentConfig, ini: &Ini| Ok(GenericAgent::new(cfg, ini)? as _),
    manager: |h| {
        Arc::new(GenericManager {
            h,
            versions: Mutex::new(Vec::new()),
            current: Mutex::new(None),
        })
    },
};

/// Scripts the agent runs, by the command name of `execute_script`.
pub const COMMANDS: &[&str] = &["init", "notify", "run", "interrupt", "cleanup"];

/// Largest archive: it travels base64-encoded in a JSON request to each agent, whose body
/// limit is [`crate::rpc::MAX_BODY`].
pub const MAX_ARCHIVE: usize = crate::rpc::MAX_BODY / 4 * 3 - 64 * 1024;

/// Longest output kept in a script status.
const OUTPUT_TAIL: u64 = 64 * 1024;

/// A node as scripts see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeEntry {
    pub id: String,
    pub name: String,
    pub ip: String,
}

impl From<&ServiceNode> for NodeEntry {
    fn from(n: &ServiceNode) -> Self {
        NodeEntry {
            id: n.id.clone(),
            name: n.name.clone(),
            ip: n.ip.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct ScriptStatus {
    /// `RUNNING`, `STOPPED` (finished), `MISSING` (not in the archive), `FAILED` (could not start).
    pub state: String,
    pub returncode: Option<i32>,
    pub started: f64,
    pub finished: Option<f64>,
    pub uid: Option<u32>,
    pub output: String,
    pub error: Option<String>,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn valid_version_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

// ---------------------------------------------------------------- agent

#[derive(Default)]
struct AgentState {
    current: Option<String>,
    scripts: BTreeMap<String, ScriptStatus>,
    /// Process group of a running `run.sh`.
    run_pgid: Option<i32>,
}

pub struct GenericAgent {
    node_name: String,
    code_dir: PathBuf,
    /// The user scripts run as (None: the agent is not root and runs them as itself).
    user: Option<(String, nix::unistd::Uid, nix::unistd::Gid)>,
    user_error: Option<String>,
    queue: tokio::sync::Mutex<()>,
    state: Mutex<AgentState>,
}

impl GenericAgent {
    /// Settings from `[agent]`: `CODE_DIR` (default `$VAR_CACHE/code`), `SCRIPT_USER`
    /// (default `nobody`).
    pub fn new(cfg: &AgentConfig, ini: &Ini) -> Result<Arc<Self>> {
        let code_dir = match ini.get("agent", "CODE_DIR").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => {
                PathBuf::from(ini.get_or("agent", "VAR_CACHE", "/var/cache/cpsagent")).join("code")
            }
        };
        let name = ini.get_or("agent", "SCRIPT_USER", "nobody");
        let (user, user_error) = if !nix::unistd::geteuid().is_root() {
            tracing::warn!("the agent is not root: scripts run as the agent's own user");
            (None, None)
        } else {
            match nix::unistd::User::from_name(&name) {
                Ok(Some(u)) if u.uid.is_root() => (
                    None,
                    Some(format!("SCRIPT_USER '{name}' is root; refusing")),
                ),
                Ok(Some(u)) => (Some((name, u.uid, u.gid)), None),
                _ => (None, Some(format!("SCRIPT_USER '{name}' does not exist"))),
            }
        };
        if let Some(e) = &user_error {
            tracing::error!("{e}: scripts will not run");
        }
        Ok(Arc::new(GenericAgent {
            node_name: cfg.node_id.clone(),
            code_dir,
            user,
            user_error,
            queue: tokio::sync::Mutex::new(()),
            state: Mutex::new(AgentState::default()),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AgentState> {
        self.state.lock().expect("generic agent state")
    }

    async fn startup(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        Ok(json!({}))
    }

    /// POST `update_code(codeVersionId, filename, archive)`: `archive` is base64; unpacked
    /// into `CODE_DIR/<codeVersionId>` (kept if the same archive is there already) and made
    /// the current version.
    async fn update_code(self: &Arc<Self>, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let id = a.req("codeVersionId", is_string)?;
        let filename = a.opt("filename", is_string, String::new())?;
        let data = a.req("archive", is_string)?;
        a.finish()?;
        if !valid_version_id(&id) {
            return Err(RpcError(format!("Invalid codeVersionId '{id}'")));
        }
        let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data)
            .map_err(|e| RpcError(format!("Parameter 'archive': bad base64: {e}.")))?;
        let me = self.clone();
        let id2 = id.clone();
        tokio::task::spawn_blocking(move || me.install(&id2, &bytes))
            .await
            .map_err(|e| RpcError(format!("internal error: {e}")))?
            .map_err(|e| {
                RpcError(format!(
                    "Cannot install code version {id} ({filename}): {e:#}"
                ))
            })?;
        self.state().current = Some(id.clone());
        tracing::info!("code version {id} ({filename}) is current");
        Ok(json!({"codeVersionId": id}))
    }

    fn install(&self, id: &str, bytes: &[u8]) -> Result<()> {
        std::fs::create_dir_all(&self.code_dir)
            .with_context(|| format!("creating {}", self.code_dir.display()))?;
        std::fs::set_permissions(&self.code_dir, std::fs::Permissions::from_mode(0o755))?;
        let dest = self.code_dir.join(id);
        // The digest of the archive beside the tree: the same id with other content (a
        // restarted manager counts from code-1 again) replaces the old tree.
        let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes));
        let stamp = self.code_dir.join(format!(".{id}.sha256"));
        if dest.is_dir() {
            if std::fs::read_to_string(&stamp).ok().as_deref() == Some(digest.as_str()) {
                return Ok(());
            }
            let old = self
                .code_dir
                .join(format!(".old-{id}-{}", crate::pki::random_hex(4)));
            std::fs::rename(&dest, &old)?;
            std::fs::remove_dir_all(&old)?;
        }
        archive::extract(bytes, &dest)?;
        if let Some((_, uid, gid)) = &self.user {
            chown_tree(&dest, *uid, *gid)?;
        }
        std::fs::write(&stamp, &digest)?;
        Ok(())
    }

    /// POST `run_script(command, nodes?)`: starts `<command>.sh` of the current code version
    /// in the background; `nodes` (a list of `{id, name, ip}`) replaces the node list first.
    async fn run_script(self: &Arc<Self>, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let command = a.req("command", is_string)?;
        let nodes = a.opt("nodes", is_list, Vec::new())?;
        a.finish()?;
        if !COMMANDS.contains(&command.as_str()) {
            return Err(RpcError(format!(
                "Invalid command '{command}' (one of: {})",
                COMMANDS.join(", ")
            )));
        }
        let nodes: Vec<NodeEntry> = nodes
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()
            .map_err(|e| RpcError(format!("Parameter 'nodes': {e}.")))?;
        let Some(version) = self.state().current.clone() else {
            return Err(RpcError::new("No code version installed"));
        };
        if let Some(e) = &self.user_error {
            return Err(RpcError(e.clone()));
        }
        let script = format!("{command}.sh");
        let me = self.clone();
        let s2 = script.clone();
        tokio::spawn(async move { me.run(s2, version, nodes).await });
        Ok(json!({"script": script}))
    }

    async fn run(self: Arc<Self>, script: String, version: String, nodes: Vec<NodeEntry>) {
        let queued = !matches!(script.as_str(), "run.sh" | "interrupt.sh");
        let _turn = if queued {
            Some(self.queue.lock().await)
        } else {
            None
        };
        let dir = self.code_dir.join(&version);
        let started = now();
        let set = |st: ScriptStatus| {
            self.state().scripts.insert(script.clone(), st);
        };
        if !nodes.is_empty() {
            if let Err(e) = self.write_nodes(&nodes) {
                tracing::warn!("writing the node list: {e:#}");
            }
        }
        if !dir.join(&script).is_file() {
            tracing::info!("{script}: not in code version {version}; skipped");
            set(ScriptStatus {
                state: "MISSING".into(),
                started,
                ..Default::default()
            });
            return;
        }
        let log = self.code_dir.join("logs").join(format!("{script}.log"));
        let child = self.spawn(&script, &dir, &log);
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{script}: cannot start: {e:#}");
                set(ScriptStatus {
                    state: "FAILED".into(),
                    started,
                    finished: Some(now()),
                    error: Some(format!("{e:#}")),
                    ..Default::default()
                });
                return;
            }
        };
        let pid = child.id().unwrap_or(0) as i32;
        let raw_uid = self
            .user
            .as_ref()
            .map(|u| u.1.as_raw())
            .unwrap_or_else(|| nix::unistd::geteuid().as_raw());
        let uid = Some(raw_uid);
        tracing::info!(
            "{script} started (pid {pid}, uid {raw_uid}) in {}",
            dir.display()
        );
        set(ScriptStatus {
            state: "RUNNING".into(),
            started,
            uid,
            ..Default::default()
        });
        if script == "run.sh" {
            self.state().run_pgid = Some(pid);
        }
        let status = child.wait().await;
        if script == "run.sh" {
            self.state().run_pgid = None;
        }
        if script == "interrupt.sh" {
            let pg = self.state().run_pgid;
            if let Some(pg) = pg {
                tracing::info!("interrupt: stopping run.sh (process group {pg})");
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pg),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let code = status.as_ref().ok().and_then(|s| s.code());
        tracing::info!("{script} exited with {code:?}");
        set(ScriptStatus {
            state: "STOPPED".into(),
            returncode: code,
            started,
            finished: Some(now()),
            uid,
            output: tail(&log, OUTPUT_TAIL),
            error: status.err().map(|e| e.to_string()),
        });
    }

    /// `CODE_DIR/nodes` (`id ip` lines, for scripts) and `nodes.json` (with names).
    fn write_nodes(&self, nodes: &[NodeEntry]) -> Result<()> {
        let text: String = nodes
            .iter()
            .map(|n| format!("{} {}\n", n.id, n.ip))
            .collect();
        for (name, content) in [
            ("nodes", text),
            ("nodes.json", serde_json::to_string(nodes)?),
        ] {
            let tmp = self.code_dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, content)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
            std::fs::rename(&tmp, self.code_dir.join(name))?;
        }
        Ok(())
    }

    fn read_nodes(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.code_dir.join("nodes"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn spawn(&self, script: &str, dir: &Path, log: &Path) -> Result<tokio::process::Child> {
        let logs = log.parent().expect("log dir");
        std::fs::create_dir_all(logs)?;
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let nodes = self.read_nodes();
        let ids: Vec<&str> = nodes.iter().map(|n| n.0.as_str()).collect();
        let ips: Vec<&str> = nodes.iter().map(|n| n.1.as_str()).collect();
        let me = self
            .read_nodes_full()
            .into_iter()
            .find(|n| n.name == self.node_name)
            .map(|n| n.id)
            .unwrap_or_else(|| self.node_name.clone());
        let mut cmd = std::process::Command::new("/bin/bash");
        cmd.arg(script)
            .current_dir(dir)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", dir)
            .env("LANG", "C.UTF-8")
            .env("CONPAAS_NODES", ids.join(" "))
            .env("CONPAAS_NODE_IPS", ips.join(" "))
            .env("CONPAAS_NODES_FILE", self.code_dir.join("nodes"))
            .env("CONPAAS_NODE_ID", me)
            .env("CONPAAS_CODE_DIR", dir)
            .env("CONPAAS_SCRIPT", script)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        if let Some((name, uid, gid)) = &self.user {
            // std drops the supplementary groups of root when it changes the uid.
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
            cmd.env("USER", name).env("LOGNAME", name);
        }
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("running {script}"))?;
        Ok(child)
    }

    /// The node list with names (kept beside the plain file for `CONPAAS_NODE_ID`).
    fn read_nodes_full(&self) -> Vec<NodeEntry> {
        std::fs::read_to_string(self.code_dir.join("nodes.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    }

    /// GET `get_script_status`: `{codeVersionId, scripts: {script: status}}`.
    async fn get_script_status(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        let s = self.state();
        Ok(json!({"codeVersionId": s.current, "scripts": s.scripts}))
    }
}

fn tail(p: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(p) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        let _ = f.seek(SeekFrom::Start(len - max));
    }
    let mut b = Vec::new();
    let _ = f.read_to_end(&mut b);
    String::from_utf8_lossy(&b).into_owned()
}

/// Gives the tree to the script user, children before their directory: while a directory's
/// entries are handled it still belongs to root, so no script can swap them for links.
fn chown_tree(p: &Path, uid: nix::unistd::Uid, gid: nix::unistd::Gid) -> Result<()> {
    let m = std::fs::symlink_metadata(p)?;
    if m.is_dir() {
        for e in std::fs::read_dir(p)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    std::os::unix::fs::lchown(p, Some(uid.as_raw()), Some(gid.as_raw()))
        .with_context(|| format!("chown {}", p.display()))
}

impl AgentService for GenericAgent {
    fn expose(self: Arc<Self>, m: &mut Methods) {
        expose!(m, self, {
            POST startup, POST update_code, POST run_script, GET get_script_status,
        });
    }
}

// ---------------------------------------------------------------- manager

struct CodeVersion {
    id: String,
    filename: String,
    description: String,
    time: f64,
    bytes: Arc<Vec<u8>>,
}

pub struct GenericManager {
    h: ManagerHandle,
    versions: Mutex<Vec<CodeVersion>>,
    current: Mutex<Option<String>>,
}

impl GenericManager {
    fn current(&self) -> Option<(String, String, Arc<Vec<u8>>)> {
        let id = self.current.lock().expect("current").clone()?;
        let v = self.versions.lock().expect("versions");
        v.iter()
            .find(|c| c.id == id)
            .map(|c| (c.id.clone(), c.filename.clone(), c.bytes.clone()))
    }

    /// UPLOAD `upload_code_version(code, description?)`: checks the archive (the same
    /// extraction rules as the agents) and stores it; the first version becomes current.
    async fn upload_code_version(&self, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let (filename, bytes) = a.req("code", is_uploaded_bytes)?;
        let description = a.opt("description", is_string, String::new())?;
        a.finish()?;
        if bytes.len() > MAX_ARCHIVE {
            return Err(RpcError(format!(
                "Invalid archive {filename}: {} bytes, at most {MAX_ARCHIVE} can be sent to the agents",
                bytes.len()
            )));
        }
        let b2 = bytes.clone();
        tokio::task::spawn_blocking(move || archive::check(&b2, &std::env::temp_dir()))
            .await
            .map_err(|e| RpcError(format!("internal error: {e}")))?
            .map_err(|e| RpcError(format!("Invalid archive {filename}: {e:#}")))?;
        let mut v = self.versions.lock().expect("versions");
        let id = format!("code-{}", v.len() + 1);
        v.push(CodeVersion {
            id: id.clone(),
            filename: filename.clone(),
            description,
            time: now(),
            bytes: Arc::new(bytes),
        });
        let mut cur = self.current.lock().expect("current");
        if cur.is_none() {
            *cur = Some(id.clone());
        }
        tracing::info!("code version {id} uploaded ({filename})");
        Ok(json!({"codeVersionId": id}))
    }

    async fn list_code_versions(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        let cur = self.current.lock().expect("current").clone();
        let v = self.versions.lock().expect("versions");
        let list: Vec<Value> = v
            .iter()
            .map(|c| {
                json!({"codeVersionId": c.id, "filename": c.filename, "description": c.description,
                       "time": c.time, "size": c.bytes.len(), "current": Some(&c.id) == cur.as_ref()})
            })
            .collect();
        Ok(json!({"codeVersions": list}))
    }

    /// POST `enable_code(codeVersionId)`: makes it current and installs it on every node,
    /// which then runs its `init.sh`.
    async fn enable_code(&self, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let id = a.req("codeVersionId", is_string)?;
        a.finish()?;
        if !self
            .versions
            .lock()
            .expect("versions")
            .iter()
            .any(|c| c.id == id)
        {
            return Err(RpcError(format!("Invalid codeVersionId '{id}'")));
        }
        let nodes = self.h.nodes_in(
            "enable_code",
            &[State::RUNNING, State::INIT, State::STOPPED],
        )?;
        *self.current.lock().expect("current") = Some(id.clone());
        if !nodes.is_empty() {
            let m = self.h.get()?;
            self.install(&m, &nodes, &nodes).await.map_err(RpcError)?;
        }
        Ok(json!({"codeVersionId": id}))
    }

    /// POST `execute_script(command)`: runs `<command>.sh` on every node.
    async fn execute_script(&self, p: Params) -> RpcResult {
        let mut a = Args::new(p);
        let command = a.req("command", is_string)?;
        a.finish()?;
        if !COMMANDS.contains(&command.as_str()) {
            return Err(RpcError(format!(
                "Invalid command '{command}' (one of: {})",
                COMMANDS.join(", ")
            )));
        }
        let nodes = self.h.nodes_in("execute_script", &[State::RUNNING])?;
        let m = self.h.get()?;
        run_on(&m, &nodes, &command, &nodes)
            .await
            .map_err(RpcError)?;
        Ok(json!({"command": command, "nodes": nodes.len()}))
    }

    /// GET `get_script_status`: `{nodes: {node id: agent status or {error}}}`.
    async fn get_script_status(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        let nodes = self
            .h
            .nodes_in("get_script_status", &[State::RUNNING, State::ADAPTING])?;
        let m = self.h.get()?;
        let mut out = serde_json::Map::new();
        for (id, r) in m
            .call_nodes(&nodes, false, "get_script_status", &json!({}))
            .await
        {
            out.insert(id, r.unwrap_or_else(|e| json!({"error": e.to_string()})));
        }
        Ok(json!({"nodes": out}))
    }

    /// Sends the current code to `targets` and runs `init.sh` there (`all`: the node list).
    async fn install(
        &self,
        m: &Manager,
        targets: &[ServiceNode],
        all: &[ServiceNode],
    ) -> Result<(), String> {
        let Some((id, filename, bytes)) = self.current() else {
            return Ok(());
        };
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &*bytes);
        let params = json!({"codeVersionId": id, "filename": filename, "archive": b64});
        for (nid, r) in m.call_nodes(targets, true, "update_code", &params).await {
            r.map_err(|e| format!("installing code version {id} on node {nid} failed: {e}"))?;
        }
        run_on(m, targets, "init", all).await
    }
}

/// Starts `command` on `targets`, with `all` as the node list.
async fn run_on(
    m: &Manager,
    targets: &[ServiceNode],
    command: &str,
    all: &[ServiceNode],
) -> Result<(), String> {
    let list: Vec<NodeEntry> = all.iter().map(NodeEntry::from).collect();
    let params = json!({"command": command, "nodes": list});
    for (nid, r) in m.call_nodes(targets, true, "run_script", &params).await {
        r.map_err(|e| format!("{command}.sh on node {nid}: {e}"))?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl ManagerService for GenericManager {
    fn expose(self: Arc<Self>, m: &mut Methods) {
        expose!(m, self, {
            UPLOAD upload_code_version, GET list_code_versions, POST enable_code,
            POST execute_script, GET get_script_status,
        });
    }

    /// New nodes get the current code and run `init.sh`; then every node runs `notify.sh`.
    async fn on_nodes_added(
        &self,
        m: &Manager,
        added: &[ServiceNode],
        all: &[ServiceNode],
    ) -> Result<(), String> {
        if self.current().is_none() {
            return Ok(());
        }
        self.install(m, added, all).await?;
        run_on(m, all, "notify", all).await
    }

    /// The remaining nodes run `notify.sh` with the new node list.
    async fn on_nodes_removed(
        &self,
        m: &Manager,
        _removed: &[ServiceNode],
        remaining: &[ServiceNode],
    ) -> Result<(), String> {
        if self.current().is_none() || remaining.is_empty() {
            return Ok(());
        }
        run_on(m, remaining, "notify", remaining).await
    }
}
