//! The service registry: which services exist, and how each one plugs into the agent and the
//! manager (the counterpart of the original `core/services.py`).
//!
//! A service is one module here (`<name>.rs`, or `<name>/mod.rs`) exporting a
//! [`ServiceDef`] named `SERVICE`, plus its config annexes `config/agent/<name>-agent.cfg` and
//! `config/manager/<name>-manager.cfg`. Registering it takes one line in this file: its name in
//! the `registry!` list, which declares the module and adds it to [`SERVICES`].
//! `mkimage service new NAME` writes the files and inserts that line above the
//! `BLUEPRINT_INSERT_SERVICE` marker (keep the marker).
//!
//! Nothing else in the runtime names a service: the agent adds the service's methods to its
//! core ones (`check_process`, `get_log`), the manager adds them to its own and calls the
//! service's hooks when nodes were added or removed.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use anyhow::Result;
use async_trait::async_trait;
use serde_json::{json, Value};

use crate::agent::AgentConfig;
use crate::cloud::ServiceNode;
use crate::config::Ini;
use crate::manager::{Manager, State};
use crate::rpc::{Methods, RpcError};

pub mod archive;

/// Declares each service's module and lists its `SERVICE` in [`SERVICES`].
macro_rules! registry {
    ($($name:ident),* $(,)?) => {
        $(pub mod $name;)*

        /// Every service the runtime knows, by `TYPE`.
        pub static SERVICES: &[ServiceDef] = &[$($name::SERVICE),*];
    };
}

registry! {
    helloworld,
    generic,
    // BLUEPRINT_INSERT_SERVICE (`mkimage service new` adds `<name>,` above this line)
}

/// How one service plugs into the runtime.
pub struct ServiceDef {
    /// The service type (`TYPE` in the agent and manager configs).
    pub name: &'static str,
    /// Manager side, at config time: the replacements handed to the agent's config annex
    /// (`{{ KEY }}` in `config/agent/<name>-agent.cfg`), from the `[manager]` section.
    pub replacements: fn(&Ini) -> BTreeMap<String, String>,
    /// Agent side: the service's half of the agent, from the agent config and its file.
    pub agent: fn(&AgentConfig, &Ini) -> Result<Arc<dyn AgentService>>,
    /// Manager side: the service's half of the manager. It keeps the handle to reach the
    /// manager's nodes and state from its exposed methods.
    pub manager: fn(ManagerHandle) -> Arc<dyn ManagerService>,
}

/// The registered service called `name`.
pub fn lookup(name: &str) -> Option<&'static ServiceDef> {
    SERVICES.iter().find(|s| s.name == name)
}

/// Names of the registered services.
pub fn names() -> Vec<&'static str> {
    SERVICES.iter().map(|s| s.name).collect()
}

/// The registered service called `name`, or an error naming the known ones.
pub fn require(name: &str) -> Result<&'static ServiceDef> {
    lookup(name).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown service type '{name}' (known: {})",
            names().join(", ")
        )
    })
}

/// The manager half of service `name`; a service without methods or hooks of its own
/// (default `startup` hook) when `name` is not registered.
pub fn manager_service(name: &str, h: ManagerHandle) -> Arc<dyn ManagerService> {
    match lookup(name) {
        Some(d) => (d.manager)(h),
        None => {
            tracing::warn!("unknown service type '{name}': core methods only");
            Arc::new(CoreOnly)
        }
    }
}

/// The agent half of the service in `cfg.service_type`; none (core methods only, with a
/// warning) when it is not registered.
pub fn agent_service(cfg: &AgentConfig, ini: &Ini) -> Result<Option<Arc<dyn AgentService>>> {
    match lookup(&cfg.service_type) {
        Some(d) => Ok(Some((d.agent)(cfg, ini)?)),
        None => {
            tracing::warn!(
                "unknown service type '{}': core methods only",
                cfg.service_type
            );
            Ok(None)
        }
    }
}

struct CoreOnly;
impl ManagerService for CoreOnly {}

/// No replacements (services whose agent annex needs none).
pub fn no_replacements(_: &Ini) -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// The agent half of a service: methods added to the agent's service 0.
pub trait AgentService: Send + Sync + 'static {
    fn expose(self: Arc<Self>, methods: &mut Methods);
}

/// The manager half of a service: methods added to the manager's service 0, and hooks.
#[async_trait]
pub trait ManagerService: Send + Sync + 'static {
    fn expose(self: Arc<Self>, _methods: &mut Methods) {}

    /// New nodes answer `check_process` (after `startup` or `add_nodes`); `all` includes
    /// them. An error puts the service in ERROR. Default: POST `startup` on each new agent
    /// (the original `on_start`/`on_add_nodes`).
    async fn on_nodes_added(
        &self,
        m: &Manager,
        added: &[ServiceNode],
        _all: &[ServiceNode],
    ) -> Result<(), String> {
        post_startup(m, added).await
    }

    /// Nodes were removed and deleted (`remove_nodes`); `remaining` are still there.
    /// Errors are logged; the service stays RUNNING.
    async fn on_nodes_removed(
        &self,
        _m: &Manager,
        _removed: &[ServiceNode],
        _remaining: &[ServiceNode],
    ) -> Result<(), String> {
        Ok(())
    }
}

/// POST `startup` on every node; the first failure is reported.
pub async fn post_startup(m: &Manager, nodes: &[ServiceNode]) -> Result<(), String> {
    for (id, r) in m.call_nodes(nodes, true, "startup", &json!({})).await {
        r.map_err(|e| format!("startup of node {id} failed: {e}"))?;
    }
    Ok(())
}

/// A service's way back to its manager (weak: the manager owns the service).
#[derive(Clone)]
pub struct ManagerHandle(pub(crate) Weak<Manager>);

impl ManagerHandle {
    /// The manager; an error while it is being dropped.
    pub fn get(&self) -> Result<Arc<Manager>, RpcError> {
        self.0
            .upgrade()
            .ok_or_else(|| RpcError::new("The manager is shutting down"))
    }

    /// The nodes, if the service is in one of `states` (else the original's message).
    pub fn nodes_in(&self, op: &str, states: &[State]) -> Result<Vec<ServiceNode>, RpcError> {
        let m = self.get()?;
        let st = m.state();
        if !states.contains(&st) {
            let allowed: Vec<String> = states.iter().map(|s| s.to_string()).collect();
            return Err(RpcError(format!(
                "Wrong state to {op}: service is {st} (must be {})",
                allowed.join(" or ")
            )));
        }
        Ok(m.nodes())
    }
}

/// The `result` string of an agent answer `{"result": …}`, else the whole answer as JSON.
pub fn result_string(v: &Value) -> String {
    v.get("result")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique_and_valid() {
        let n = names();
        let mut sorted = n.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), n.len(), "{n:?}");
        for name in n {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
                "{name}"
            );
        }
        assert!(lookup("helloworld").is_some() && lookup("generic").is_some());
        assert!(require("nosuch")
            .err()
            .unwrap()
            .to_string()
            .contains("unknown service type 'nosuch' (known: helloworld, generic"));
    }
}
