//! Hello World: every agent answers `get_helloworld` with its `STRING_TO_GENERATE`; the
//! manager's `get_helloworld` collects "Received STRING from NODE-ID" from all of them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::json;

use super::{AgentService, ManagerHandle, ManagerService, ServiceDef};
use crate::agent::AgentConfig;
use crate::args::Args;
use crate::config::Ini;
use crate::expose;
use crate::manager::State;
use crate::rpc::{Methods, Params, RpcError, RpcResult};

pub const SERVICE: ServiceDef = ServiceDef {
    name: "helloworld",
    replacements,
    agent: |cfg: &AgentConfig, _: &Ini| {
        Ok(Arc::new(HelloWorldAgent {
            string: cfg.string_to_generate.clone(),
            started: AtomicBool::new(false),
        }))
    },
    manager: |h| Arc::new(HelloWorldManager { h }),
};

/// `CONTEXT_STRING` of the manager becomes the agents' `STRING_TO_GENERATE`.
fn replacements(ini: &Ini) -> BTreeMap<String, String> {
    BTreeMap::from([(
        "STRING".to_string(),
        ini.get_or("manager", "CONTEXT_STRING", "helloworld"),
    )])
}

pub struct HelloWorldAgent {
    string: String,
    started: AtomicBool,
}

impl HelloWorldAgent {
    async fn startup(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        self.started.store(true, Ordering::SeqCst);
        tracing::info!("Agent started up");
        Ok(json!({}))
    }

    async fn get_helloworld(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        Ok(json!({"result": self.string}))
    }
}

impl AgentService for HelloWorldAgent {
    fn expose(self: Arc<Self>, m: &mut Methods) {
        expose!(m, self, { POST startup, GET get_helloworld });
    }
}

pub struct HelloWorldManager {
    h: ManagerHandle,
}

impl HelloWorldManager {
    async fn get_helloworld(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        let nodes = self.h.nodes_in("get_helloworld", &[State::RUNNING])?;
        let m = self.h.get()?;
        let mut lines = Vec::new();
        for (id, r) in m
            .call_nodes(&nodes, false, "get_helloworld", &json!({}))
            .await
        {
            match r {
                Ok(v) => lines.push(format!("Received {} from {id}", super::result_string(&v))),
                Err(e) => return Err(RpcError(format!("Node {id} did not answer: {e}"))),
            }
        }
        Ok(json!({"helloworld": lines.join("\n")}))
    }
}

impl ManagerService for HelloWorldManager {
    fn expose(self: Arc<Self>, m: &mut Methods) {
        expose!(m, self, { GET get_helloworld });
    }
}
