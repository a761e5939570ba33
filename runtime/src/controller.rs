//! Node provisioning: create nodes through a [`Cloud`], poll their agent's `check_process`
//! until they answer (every `poll`, giving up after `boot_timeout`), delete the ones that never
//! answered and retry on fresh nodes (at most `max_retries` extra rounds).
//!
//! A manager may use several clouds: `cloud` is the default one, `other_clouds` the rest;
//! nodes are created in the cloud a request names and deleted in the cloud they belong to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::RpcClient;
use crate::cloud::{Cloud, NodeRequest, ServiceNode};
use crate::context::{ConfigTree, NodeVars};
use crate::enrol::Enroller;
use crate::pki::{Identity, Role};

pub struct Controller {
    /// The default cloud (`CLOUD`, named `CLOUD_NAME`).
    pub cloud: Arc<dyn Cloud>,
    /// More clouds (`OTHER_CLOUDS`), picked by name.
    pub other_clouds: Vec<Arc<dyn Cloud>>,
    pub config: ConfigTree,
    pub enroller: Arc<Enroller>,
    pub agent_tls: Arc<rustls::ClientConfig>,
    /// Template for every node's context (node id, token and port are filled per node).
    pub base_vars: NodeVars,
    pub poll: Duration,
    pub boot_timeout: Duration,
    pub max_retries: u32,
    /// The user's startup script (UPLOAD `upload_startup_script`), run by new nodes at boot.
    pub startup_script: std::sync::Mutex<Option<String>>,
}

/// Result of [`Controller::create_nodes`].
#[derive(Debug, Default)]
pub struct Created {
    pub ready: Vec<ServiceNode>,
    /// Nodes that never answered (already deleted).
    pub failed: Vec<ServiceNode>,
    /// Creation errors reported by the cloud.
    pub errors: Vec<String>,
}

impl Controller {
    pub fn agent_client(&self, node: &ServiceNode) -> RpcClient {
        RpcClient::new(self.agent_tls.clone(), node.addr())
    }

    fn node_vars(&self, name: &str) -> NodeVars {
        let mut v = self.base_vars.clone();
        v.node_id = name.to_string();
        v.startup_script = self.startup_script.lock().expect("script lock").clone();
        v.role = Role::Agent;
        v.token = self.enroller.mint(
            name,
            Identity {
                role: Role::Agent,
                uid: self.base_vars.user_id,
                app: self.base_vars.app_id,
            },
        );
        v
    }

    /// The cloud called `name`; `default` (or empty, or `None` as the original) is the
    /// default cloud.
    pub fn cloud_named(&self, name: &str) -> Option<Arc<dyn Cloud>> {
        if matches!(name, "" | "default" | "None") {
            return Some(self.cloud.clone());
        }
        self.clouds().into_iter().find(|c| c.cloud_name() == name)
    }

    /// Every cloud, the default first.
    pub fn clouds(&self) -> Vec<Arc<dyn Cloud>> {
        let mut v = vec![self.cloud.clone()];
        v.extend(self.other_clouds.iter().cloned());
        v
    }

    pub fn cloud_names(&self) -> Vec<String> {
        self.clouds()
            .iter()
            .map(|c| c.cloud_name().to_string())
            .collect()
    }

    /// Deletes, in every cloud, the nodes of this manager that are not in `known` (left over
    /// from an earlier run). Returns `(cloud name, vmid)` of each; a cloud that cannot be
    /// asked is logged and skipped.
    pub async fn reap_orphans(&self, known: &[ServiceNode]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for c in self.clouds() {
            match c.reap_orphans(known).await {
                Ok(ids) => out.extend(ids.into_iter().map(|i| (c.cloud_name().to_string(), i))),
                Err(e) => tracing::warn!(
                    "looking for orphan nodes in cloud {}: {e:#}",
                    c.cloud_name()
                ),
            }
        }
        out
    }

    /// The cloud a node belongs to (the default cloud when its name is unknown).
    fn cloud_of(&self, node: &ServiceNode) -> Arc<dyn Cloud> {
        self.clouds()
            .into_iter()
            .find(|c| c.cloud_name() == node.cloud)
            .unwrap_or_else(|| self.cloud.clone())
    }

    /// Is the node's agent answering `check_process`?
    pub async fn check(&self, node: &ServiceNode) -> bool {
        let mut c = self.agent_client(node);
        c.timeout = self
            .poll
            .clamp(Duration::from_millis(500), Duration::from_secs(10));
        match c.get(0, "check_process", &json!({})).await {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!("node {} not ready: {e}", node.id);
                false
            }
        }
    }

    async fn wait_ready(&self, node: &ServiceNode) -> bool {
        let start = Instant::now();
        loop {
            if self.check(node).await {
                return true;
            }
            if start.elapsed() >= self.boot_timeout {
                return false;
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Creates `count` ready nodes of `role` in `cloud` (fewer if the retries run out).
    pub async fn create_nodes(&self, cloud: &dyn Cloud, count: usize, role: &str) -> Created {
        let mut out = Created::default();
        let mut round = 0;
        while out.ready.len() < count && round <= self.max_retries {
            round += 1;
            let need = count - out.ready.len();
            tracing::info!(
                "creating {need} node(s) of role {role} in cloud {} (round {round})",
                cloud.cloud_name()
            );
            let mut pending = Vec::new();
            for _ in 0..need {
                let name = format!(
                    "{}-u{}-a{}-s{}-{}-{}",
                    self.base_vars.deployment_name,
                    self.base_vars.user_id,
                    self.base_vars.app_id,
                    self.base_vars.service_id,
                    self.base_vars.service_type,
                    crate::pki::random_hex(4)
                );
                let req = NodeRequest {
                    vars: self.node_vars(&name),
                    role: role.to_string(),
                    config: self.config.clone(),
                };
                match cloud.create_node(req).await {
                    Ok(n) => pending.push(n),
                    Err(e) => {
                        self.enroller.revoke_node(&name);
                        tracing::warn!("creating node failed: {e:#}");
                        out.errors.push(format!("{e:#}"));
                    }
                }
            }
            let checks = pending.iter().map(|n| self.wait_ready(n));
            let results = join_all(checks).await;
            for (node, ok) in pending.into_iter().zip(results) {
                if ok {
                    tracing::info!("node {} is ready", node.id);
                    out.ready.push(node);
                } else {
                    tracing::warn!("node {} never answered; deleting it", node.id);
                    self.enroller.revoke_node(&node.name);
                    if let Err(e) = cloud.delete_node(&node).await {
                        tracing::warn!("deleting node {} failed: {e:#}", node.id);
                    }
                    out.failed.push(node);
                }
            }
        }
        out
    }

    pub async fn delete_nodes(&self, nodes: &[ServiceNode]) {
        for n in nodes {
            self.enroller.revoke_node(&n.name);
            if let Err(e) = self.cloud_of(n).delete_node(n).await {
                tracing::warn!("deleting node {} failed: {e:#}", n.id);
            }
        }
    }
}

/// Runs futures concurrently on the current task and returns their outputs in order.
pub async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    let mut futs: Vec<Option<_>> = futs.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, slot) in futs.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        outs[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outs.into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
}
