//! The agent (service id 0): `check_process`, `get_log` and the methods of its service
//! (from the registry, `crate::services`, by `TYPE`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::json;

use crate::args::Args;
use crate::config::Ini;
use crate::expose;
use crate::pki::{self, CertPaths, PeerRule};
use crate::rpc::{Dispatcher, Exposed, Methods, Params, RpcError, RpcResult};

const SECTION: &str = "agent";

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub service_type: String,
    pub user_id: u64,
    pub app_id: u64,
    pub service_id: u64,
    pub node_id: String,
    pub bind: String,
    pub port: u16,
    pub log_file: PathBuf,
    pub cert_dir: PathBuf,
    pub enroll_url: Option<String>,
    pub enroll_token: Option<String>,
    pub string_to_generate: String,
}

impl AgentConfig {
    pub fn from_ini(ini: &Ini) -> Result<Self> {
        // Required non-empty keys, as the original default-cpsagent.
        for k in ["LOG_FILE", "ETC", "VAR_TMP", "VAR_CACHE", "VAR_RUN"] {
            ini.require(SECTION, k)?;
        }
        let opt = |k: &str| ini.get(SECTION, k).filter(|v| !v.is_empty());
        Ok(AgentConfig {
            service_type: ini.require(SECTION, "TYPE")?,
            user_id: ini
                .require(SECTION, "USER_ID")?
                .parse()
                .context("USER_ID")?,
            app_id: ini.require(SECTION, "APP_ID")?.parse().context("APP_ID")?,
            service_id: ini.parse_or(SECTION, "SERVICE_ID", 0)?,
            node_id: ini.get_or(SECTION, "NODE_ID", "agent"),
            bind: ini.get_or(SECTION, "BIND", "0.0.0.0"),
            port: ini.parse_or(SECTION, "PORT", 5555)?,
            log_file: ini.require(SECTION, "LOG_FILE")?.into(),
            cert_dir: opt("CERT_DIR")
                .unwrap_or_else(|| format!("{}/certs", ini.get_or(SECTION, "ETC", "")))
                .into(),
            enroll_url: opt("ENROLL_URL"),
            enroll_token: opt("ENROLL_TOKEN"),
            string_to_generate: ini.get_or(SECTION, "STRING_TO_GENERATE", "helloworld"),
        })
    }
}

pub struct Agent {
    cfg: AgentConfig,
    service: Option<Arc<dyn crate::services::AgentService>>,
}

impl Agent {
    /// An agent whose service settings all take their defaults.
    pub fn new(cfg: AgentConfig) -> Arc<Self> {
        Self::with_ini(cfg, &Ini::default()).expect("service with default settings")
    }

    /// An agent whose service reads its settings from `ini` (the agent's config file).
    pub fn with_ini(cfg: AgentConfig, ini: &Ini) -> Result<Arc<Self>> {
        tracing::info!(
            "'{}' agent started (uid {}, sid {})",
            cfg.service_type,
            cfg.user_id,
            cfg.service_id
        );
        let service = crate::services::agent_service(&cfg, ini)?;
        Ok(Arc::new(Agent { cfg, service }))
    }

    async fn check_process(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        Ok(json!({}))
    }

    /// Only the agent's own log file (the original read any path the caller named).
    async fn get_log(&self, p: Params) -> RpcResult {
        Args::new(p).finish()?;
        read_log(&self.cfg.log_file).await
    }
}

pub async fn read_log(path: &Path) -> RpcResult {
    match tokio::fs::read(path).await {
        Ok(b) => Ok(json!({"log": String::from_utf8_lossy(&b)})),
        Err(_) => Err(RpcError::new("Failed to read log file")),
    }
}

impl Exposed for Agent {
    fn expose(self: Arc<Self>, m: &mut Methods) {
        expose!(m, self, { GET check_process, GET get_log });
        if let Some(s) = &self.service {
            s.clone().expose(m);
        }
    }
}

/// Enrols if needed, then serves forever. `ini` is the agent's config file (service settings).
pub async fn run(cfg: AgentConfig, ini: &Ini) -> Result<()> {
    let paths = CertPaths::in_dir(&cfg.cert_dir);
    if !(paths.cert.exists() && paths.key.exists()) {
        if let (Some(url), Some(token)) = (&cfg.enroll_url, &cfg.enroll_token) {
            let ca = std::fs::read(&paths.ca)
                .with_context(|| format!("reading {}", paths.ca.display()))?;
            let id = crate::enrol::enroll(url, token, &cfg.node_id, &ca, &cfg.cert_dir).await?;
            tracing::info!("enrolled as {}", id.urn());
        }
    }
    let tls = pki::server_config(&paths, PeerRule::agent_server(cfg.user_id, cfg.app_id))?;
    let listener = tokio::net::TcpListener::bind((cfg.bind.as_str(), cfg.port))
        .await
        .with_context(|| format!("binding {}:{}", cfg.bind, cfg.port))?;
    tracing::info!("agent listening on {}", listener.local_addr()?);
    let mut d = Dispatcher::new();
    d.add_service(0, Agent::with_ini(cfg, ini)?);
    crate::rpc::serve_tls(listener, tls, d.router()).await;
    Ok(())
}

/// Used by the local cloud's dead nodes: accept TCP connections and never answer.
pub async fn dead_node(port: u16) -> Result<()> {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let mut held = Vec::new();
    loop {
        let (s, _) = l.accept().await?;
        held.push(s);
    }
}
