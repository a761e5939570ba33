//! The {{ mc_name }} service: {{ description }}
//!
//! TODO: as this file was created from a BLUEPRINT file, replace the example methods
//! (`get_{{ lc_name }}` on both sides) with the service's own, and the hooks with what the
//! service must do when nodes join or leave.
//!
//! * agent: POST `startup`, GET `get_{{ lc_name }}` → `{"result": {{ uc_name }}_MESSAGE}`;
//! * manager: GET `get_{{ lc_name }}` (RUNNING) → `{"{{ lc_name }}": ["{{ mc_name }} on <node id>: <message>", …]}`.
//!
//! Settings: `{{ uc_name }}_MESSAGE` in `[manager]` (config/manager/{{ lc_name }}-manager.cfg) is
//! handed to every agent's `[agent]` section (config/agent/{{ lc_name }}-agent.cfg).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;

use super::{AgentService, ManagerHandle, ManagerService, ServiceDef};
use crate::agent::AgentConfig;
use crate::args::Args;
use crate::cloud::ServiceNode;
use crate::config::Ini;
use crate::expose;
use crate::manager::{Manager, State};
use crate::rpc::{Methods, Params, RpcError, RpcResult};

pub const SERVICE: ServiceDef = ServiceDef {
    name: "{{ lc_name }}",
    replacements,
    agent: |cfg: &AgentConfig, ini: &Ini| Ok({{ mc_name }}Agent::new(cfg, ini) as _),
    manager: |h| Arc::new({{ mc_name }}Manager { h }),
};

/// Default of `{{ uc_name }}_MESSAGE`.
pub const DEFAULT_MESSAGE: &str = "hello from {{ lc_name }}";

/// `[manager]` settings handed to the agents' config annex.
fn replacements(ini: &Ini) -> BTreeMap<String, String> {
    BTreeMap::from([(
        "{{ uc_name }}_MESSAGE".to_string(),
        ini.get_or("manager", "{{ uc_name }}_MESSAGE", DEFAULT_MESSAGE),
    )])
}

// ---- agent ----

pub struct {{ mc_name }}Agent {
    node: String,
    message: String,
}

impl {{ mc_name }}Agent {
    pub fn new(cfg: &AgentConfig, ini: &Ini) -> Arc<Self> {
        Arc::new({{ mc_name }}Agent {
            node: cfg.node_id.clone(),
            message: ini.get_or("agent", "{{ uc_name }}_MESSAGE", DEFAULT_MESSAGE),
        })
    }

    async fn startup(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        tracing::info!("{{ mc_name }} agent {} started up", self.node);
        Ok(json!({}))
    }

    /// Example agent method.
    async fn get_{{ lc_name }}(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        Ok(json!({"result": self.message}))
    }
}

impl AgentService for {{ mc_name }}Agent {
    fn expose(self: Arc<Self>, m: &mut Methods) {
        expose!(m, self, { POST startup, GET get_{{ lc_name }} });
    }
}

// ---- manager ----

pub struct {{ mc_name }}Manager {
    h: ManagerHandle,
}

impl {{ mc_name }}Manager {
    /// Example manager method: asks every agent.
    async fn get_{{ lc_name }}(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        let nodes = self.h.nodes_in("get_{{ lc_name }}", &[State::RUNNING])?;
        let m = self.h.get()?;
        let mut out = Vec::new();
        for (id, r) in m.call_nodes(&nodes, false, "get_{{ lc_name }}", &json!({})).await {
            let v = r.map_err(|e| RpcError(format!("Node {id} did not answer: {e}")))?;
            out.push(format!("{{ mc_name }} on {id}: {}", super::result_string(&v)));
        }
        Ok(json!({ "{{ lc_name }}": out }))
    }
}

#[async_trait]
impl ManagerService for {{ mc_name }}Manager {
    fn expose(self: Arc<Self>, m: &mut Methods) {
        expose!(m, self, { GET get_{{ lc_name }} });
    }

    /// New nodes are up: start the service on them.
    async fn on_nodes_added(
        &self,
        m: &Manager,
        added: &[ServiceNode],
        _all: &[ServiceNode],
    ) -> Result<(), String> {
        super::post_startup(m, added).await
    }

    /// Nodes left: nothing to do yet.
    async fn on_nodes_removed(
        &self,
        _m: &Manager,
        _removed: &[ServiceNode],
        _remaining: &[ServiceNode],
    ) -> Result<(), String> {
        Ok(())
    }
}
