//! The `openstack` cloud driver: Keystone v3 and the Nova compute API over HTTP(S).
//!
//! * auth: `POST <AUTH_URL>/auth/tokens` (password method, user and project with their
//!   domains); the token is the `X-Subject-Token` header, the compute endpoint comes from the
//!   token's service catalog (type `compute`, `INTERFACE`, `REGION` if set). The token is
//!   reused for 30 minutes, and renewed at once when Nova answers 401;
//! * create: `POST /servers` with `imageRef`, `flavorRef` (a `SIZE_ID` that is no flavor id
//!   is looked up by name in `GET /flavors`), `networks`, `key_name`, `security_groups`,
//!   `user_data` (base64 of the node's script, with a one-time enrolment token and no private
//!   key), `config_drive`, and the [`crate::cloud::tags`] as `metadata`; then
//!   `GET /servers/{id}` every `POLL_INTERVAL` until `ACTIVE` with an address (floating
//!   before fixed unless `USE_PRIVATE_IP`), at most `ADDRESS_TIMEOUT`; a server in `ERROR`
//!   or late is deleted and the creation fails;
//! * delete: `DELETE /servers/{id}` (404 counts as deleted);
//! * list: `GET /servers/detail?name=^<node name prefix>`, kept when the metadata names this
//!   manager and this cloud; orphans (listed, unknown to the manager) are deleted at start.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use serde_json::{json, Map, Value};

use crate::cloud::{encode_user_data, node_tags, tags, Cloud, NodeRequest, Owner, ServiceNode};
use crate::cloudcfg::OpenStackSettings;

/// Nova takes at most 65535 bytes of base64 user-data; the raw script must stay below this.
pub const USER_DATA_LIMIT: usize = 49_000;

#[derive(Clone, Debug)]
struct Session {
    token: String,
    compute: String,
    /// When it was issued: renewed after [`TOKEN_REUSE`] (Keystone's default lifetime is an hour).
    issued: Instant,
}

/// How long a token is reused before a new one is requested.
const TOKEN_REUSE: Duration = Duration::from_secs(30 * 60);

pub struct OpenStackCloud {
    name: String,
    settings: OpenStackSettings,
    owner: Owner,
    http: reqwest::Client,
    session: tokio::sync::Mutex<Option<Session>>,
    flavor_ref: tokio::sync::OnceCell<String>,
    nodes: Mutex<HashMap<String, ServiceNode>>,
}

/// A Keystone `{"id": …}` or `{"name": …}` domain reference; `default` is the default
/// domain's id.
fn domain_ref(d: &str) -> Value {
    if d == "default" {
        json!({"id": "default"})
    } else {
        json!({"name": d})
    }
}

/// The password-auth request body, scoped to the project.
pub fn auth_body(s: &OpenStackSettings) -> Value {
    json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": s.user, "domain": domain_ref(&s.user_domain), "password": s.password}}},
        "scope": {"project": {"name": s.project, "domain": domain_ref(&s.project_domain)}}
    }})
}

/// The compute endpoint in a Keystone v3 token body's catalog.
pub fn compute_endpoint(token: &Value, interface: &str, region: Option<&str>) -> Result<String> {
    let catalog = token["token"]["catalog"]
        .as_array()
        .context("the token has no service catalog (is it project-scoped?)")?;
    let mut seen = Vec::new();
    for svc in catalog.iter().filter(|s| s["type"] == "compute") {
        for ep in svc["endpoints"].as_array().into_iter().flatten() {
            let ep_region = ep["region_id"].as_str().or(ep["region"].as_str());
            seen.push(format!(
                "{} {} {}",
                ep["interface"].as_str().unwrap_or("?"),
                ep_region.unwrap_or("-"),
                ep["url"].as_str().unwrap_or("?")
            ));
            if ep["interface"] != interface {
                continue;
            }
            if let Some(r) = region {
                if ep_region != Some(r) {
                    continue;
                }
            }
            if let Some(u) = ep["url"].as_str() {
                return Ok(u.trim_end_matches('/').to_string());
            }
        }
    }
    bail!(
        "no compute endpoint for interface {interface}{} in the catalog ({})",
        region.map(|r| format!(", region {r}")).unwrap_or_default(),
        if seen.is_empty() {
            "it lists no compute service".to_string()
        } else {
            format!("compute endpoints: {}", seen.join("; "))
        }
    )
}

/// `^` and the prefix with regex metacharacters escaped (Nova's `name` filter is a regex).
fn name_regex(prefix: &str) -> String {
    let mut r = String::from("^");
    for c in prefix.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            r.push('\\');
        }
        r.push(c);
    }
    r
}

/// (floating, fixed) IPv4 addresses of a server.
fn addresses(server: &Value) -> (Option<String>, Option<String>) {
    let mut floating = server["accessIPv4"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let mut fixed = None;
    for addrs in server["addresses"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
    {
        for a in addrs.as_array().into_iter().flatten() {
            if a["version"].as_i64().unwrap_or(4) != 4 {
                continue;
            }
            let Some(ip) = a["addr"].as_str() else {
                continue;
            };
            match a["OS-EXT-IPS:type"].as_str() {
                Some("floating") => {
                    floating.get_or_insert_with(|| ip.to_string());
                }
                _ => {
                    fixed.get_or_insert_with(|| ip.to_string());
                }
            }
        }
    }
    (floating, fixed)
}

impl OpenStackCloud {
    pub fn new(name: &str, settings: OpenStackSettings, owner: Owner) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        Ok(OpenStackCloud {
            name: name.to_string(),
            settings,
            owner,
            http,
            session: tokio::sync::Mutex::new(None),
            flavor_ref: tokio::sync::OnceCell::new(),
            nodes: Mutex::new(HashMap::new()),
        })
    }

    /// Password authentication: the token and the compute endpoint.
    async fn authenticate(&self) -> Result<Session> {
        let s = &self.settings;
        let url = format!("{}/auth/tokens", s.auth_url);
        let r = self
            .http
            .post(&url)
            .json(&auth_body(s))
            .send()
            .await
            .with_context(|| format!("Keystone {url}"))?;
        let status = r.status();
        let token = r
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = r.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "Keystone refused user {} (project {}): {status}: {}",
                s.user,
                s.project,
                text.trim()
            );
        }
        let token = token.context("Keystone answered without X-Subject-Token")?;
        let body: Value = serde_json::from_str(&text).context("Keystone token body")?;
        let compute = compute_endpoint(&body, &s.interface, s.region.as_deref())?;
        tracing::info!(
            "openstack cloud {}: authenticated as {} (compute {compute})",
            self.name,
            s.user
        );
        Ok(Session {
            token,
            compute,
            issued: Instant::now(),
        })
    }

    /// The current session, authenticating when there is none or it is about to expire.
    async fn session(&self, renew: bool) -> Result<Session> {
        let mut g = self.session.lock().await;
        let fresh = |s: &Session| s.issued.elapsed() < TOKEN_REUSE;
        match &*g {
            Some(s) if !renew && fresh(s) => Ok(s.clone()),
            _ => {
                let s = self.authenticate().await?;
                *g = Some(s.clone());
                Ok(s)
            }
        }
    }

    /// A Nova call (path relative to the compute endpoint): (status, JSON body or Null).
    async fn nova(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(reqwest::StatusCode, Value)> {
        let mut renew = false;
        loop {
            let s = self.session(renew).await?;
            let url = format!("{}{path}", s.compute);
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("X-Auth-Token", &s.token)
                .header("Accept", "application/json");
            if let Some(b) = body {
                req = req.json(b);
            }
            let r = req
                .send()
                .await
                .with_context(|| format!("Nova {method} {url}"))?;
            let status = r.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && !renew {
                renew = true;
                continue;
            }
            let text = r.text().await.unwrap_or_default();
            let v = if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            };
            return Ok((status, v));
        }
    }

    async fn nova_ok(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let (st, v) = self.nova(method.clone(), path, body).await?;
        if !st.is_success() {
            bail!("Nova {method} {path}: {st}: {v}");
        }
        Ok(v)
    }

    /// `SIZE_ID` as a flavor id: as given when Nova knows such an id, else the id of the
    /// flavor of that name.
    async fn flavor(&self) -> Result<String> {
        self.flavor_ref
            .get_or_try_init(|| async {
                let want = &self.settings.flavor;
                let v = self.nova_ok(reqwest::Method::GET, "/flavors", None).await?;
                let flavors = v["flavors"].as_array().cloned().unwrap_or_default();
                if let Some(f) = flavors.iter().find(|f| f["id"] == want.as_str()) {
                    return Ok(f["id"].as_str().unwrap_or(want).to_string());
                }
                if let Some(f) = flavors.iter().find(|f| f["name"] == want.as_str()) {
                    return f["id"]
                        .as_str()
                        .map(str::to_string)
                        .context("flavor without id");
                }
                let names: Vec<&str> = flavors.iter().filter_map(|f| f["name"].as_str()).collect();
                Err(anyhow!(
                    "{}: SIZE_ID '{want}' is no flavor id or name (flavors: {})",
                    self.settings.source,
                    names.join(", ")
                ))
            })
            .await
            .cloned()
    }

    /// The request body of `POST /servers`.
    pub fn server_body(&self, req: &NodeRequest, flavor: &str, script: &str) -> Result<Value> {
        let s = &self.settings;
        let metadata: Map<String, Value> = node_tags(&self.owner, &self.name, req)
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v)))
            .collect();
        let mut server = json!({
            "name": req.vars.node_id,
            "imageRef": s.image_id,
            "flavorRef": flavor,
            "user_data": encode_user_data(script, USER_DATA_LIMIT)?,
            "config_drive": s.config_drive,
            "metadata": metadata,
            "min_count": 1,
            "max_count": 1,
        });
        if let Some(n) = &s.network_id {
            server["networks"] = json!([{"uuid": n}]);
        }
        if let Some(k) = &s.key_name {
            server["key_name"] = json!(k);
        }
        if !s.security_groups.is_empty() {
            server["security_groups"] = s
                .security_groups
                .iter()
                .map(|g| json!({"name": g}))
                .collect();
        }
        Ok(json!({ "server": server }))
    }

    fn node_of(&self, server: &Value, port: u16) -> Option<ServiceNode> {
        let vmid = server["id"].as_str()?.to_string();
        let (floating, fixed) = addresses(server);
        let ip = if self.settings.use_private_ip {
            fixed.clone()
        } else {
            floating.or(fixed.clone())
        };
        Some(ServiceNode {
            id: format!("{}{vmid}", self.name),
            name: server["name"].as_str().unwrap_or_default().to_string(),
            vmid,
            ip: ip.unwrap_or_default(),
            private_ip: fixed.unwrap_or_default(),
            cloud: self.name.clone(),
            role: server["metadata"][tags::ROLE]
                .as_str()
                .unwrap_or("node")
                .to_string(),
            port,
        })
    }

    async fn wait_address(&self, id: &str, port: u16) -> Result<ServiceNode> {
        let start = Instant::now();
        loop {
            let v = self
                .nova_ok(reqwest::Method::GET, &format!("/servers/{id}"), None)
                .await?;
            let server = &v["server"];
            match server["status"].as_str() {
                Some("ACTIVE") => {
                    if let Some(n) = self.node_of(server, port).filter(|n| !n.ip.is_empty()) {
                        return Ok(n);
                    }
                }
                Some("ERROR") => bail!(
                    "server {id} went into ERROR: {}",
                    server["fault"]["message"]
                        .as_str()
                        .unwrap_or("no fault message")
                ),
                Some("DELETED") | Some("SOFT_DELETED") | Some("SHUTOFF") => {
                    bail!("server {id} is {} before it ran", server["status"])
                }
                _ => {}
            }
            if start.elapsed() >= self.settings.address_timeout {
                bail!(
                    "server {id} not ACTIVE with an address after {:?}",
                    self.settings.address_timeout
                );
            }
            tokio::time::sleep(self.settings.poll).await;
        }
    }

    async fn delete_server(&self, id: &str) -> Result<()> {
        let (st, v) = self
            .nova(reqwest::Method::DELETE, &format!("/servers/{id}"), None)
            .await?;
        if !(st.is_success() || st == reqwest::StatusCode::NOT_FOUND) {
            bail!("Nova DELETE /servers/{id}: {st}: {v}");
        }
        Ok(())
    }

    /// This manager's servers in this cloud (`GET /servers/detail`).
    pub async fn owned_servers(&self) -> Result<Vec<Value>> {
        let mut path = String::from("/servers/detail?name=");
        path.extend(form_urlencoded::byte_serialize(
            name_regex(&self.owner.name_prefix).as_bytes(),
        ));
        let v = self.nova_ok(reqwest::Method::GET, &path, None).await?;
        Ok(v["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| {
                s["metadata"][tags::MANAGER] == self.owner.manager_id.as_str()
                    && s["metadata"][tags::CLOUD] == self.name.as_str()
            })
            .cloned()
            .collect())
    }
}

#[async_trait]
impl Cloud for OpenStackCloud {
    fn cloud_name(&self) -> &str {
        &self.name
    }
    fn cloud_type(&self) -> &str {
        "openstack"
    }

    async fn create_node(&self, req: NodeRequest) -> Result<ServiceNode> {
        let flavor = self.flavor().await?;
        let script = req.config.render_script(&req.vars, "openstack")?;
        let body = self.server_body(&req, &flavor, &script)?;
        let v = self
            .nova_ok(reqwest::Method::POST, "/servers", Some(&body))
            .await?;
        let id = v["server"]["id"]
            .as_str()
            .context("Nova POST /servers answered no server id")?
            .to_string();
        tracing::info!(
            "openstack cloud {}: created server {id} for node {}",
            self.name,
            req.vars.node_id
        );
        let node = match self.wait_address(&id, req.vars.port).await {
            Ok(n) => n,
            Err(e) => {
                if let Err(d) = self.delete_server(&id).await {
                    tracing::warn!("deleting server {id}: {d:#}");
                }
                return Err(e);
            }
        };
        let node = ServiceNode {
            name: req.vars.node_id.clone(),
            role: req.role,
            ..node
        };
        self.nodes
            .lock()
            .expect("nodes lock")
            .insert(id, node.clone());
        Ok(node)
    }

    async fn delete_node(&self, node: &ServiceNode) -> Result<()> {
        self.delete_server(&node.vmid).await?;
        self.nodes.lock().expect("nodes lock").remove(&node.vmid);
        tracing::info!(
            "openstack cloud {}: deleted server {}",
            self.name,
            node.vmid
        );
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<ServiceNode>> {
        let known = self.nodes.lock().expect("nodes lock").clone();
        let mut v: Vec<ServiceNode> = self
            .owned_servers()
            .await?
            .iter()
            .filter_map(|s| {
                let port = known
                    .get(s["id"].as_str().unwrap_or_default())
                    .map(|n| n.port)
                    .unwrap_or(0);
                self.node_of(s, port)
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    async fn reap_orphans(&self, known: &[ServiceNode]) -> Result<Vec<String>> {
        let orphans: Vec<String> = self
            .owned_servers()
            .await?
            .iter()
            .filter_map(|s| s["id"].as_str())
            .filter(|id| !known.iter().any(|n| n.cloud == self.name && n.vmid == *id))
            .map(str::to_string)
            .collect();
        for id in &orphans {
            tracing::warn!(
                "openstack cloud {}: deleting orphan server {id} of manager {}",
                self.name,
                self.owner.manager_id
            );
            self.delete_server(id).await?;
        }
        Ok(orphans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_lookup_picks_interface_and_region() {
        let tok = json!({"token": {"catalog": [
            {"type": "identity", "endpoints": [{"interface": "public", "url": "http://k/v3"}]},
            {"type": "compute", "endpoints": [
                {"interface": "internal", "region_id": "R1", "url": "http://int/v2.1"},
                {"interface": "public", "region_id": "R1", "url": "http://pub1/v2.1/"},
                {"interface": "public", "region_id": "R2", "url": "http://pub2/v2.1"}]}]}});
        assert_eq!(
            compute_endpoint(&tok, "public", None).unwrap(),
            "http://pub1/v2.1"
        );
        assert_eq!(
            compute_endpoint(&tok, "public", Some("R2")).unwrap(),
            "http://pub2/v2.1"
        );
        assert_eq!(
            compute_endpoint(&tok, "internal", None).unwrap(),
            "http://int/v2.1"
        );
        let e = compute_endpoint(&tok, "admin", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("interface admin") && e.contains("http://pub2/v2.1"),
            "{e}"
        );
        assert!(compute_endpoint(&json!({"token": {}}), "public", None).is_err());
    }

    #[test]
    fn addresses_prefer_floating_ipv4() {
        let s = json!({"addresses": {"private": [
            {"addr": "fd00::5", "version": 6, "OS-EXT-IPS:type": "fixed"},
            {"addr": "10.0.0.5", "version": 4, "OS-EXT-IPS:type": "fixed"},
            {"addr": "172.24.4.9", "version": 4, "OS-EXT-IPS:type": "floating"}]}});
        assert_eq!(
            addresses(&s),
            (Some("172.24.4.9".into()), Some("10.0.0.5".into()))
        );
        assert_eq!(name_regex("dep.x-u1-"), "^dep\\.x-u1-");
    }
}
