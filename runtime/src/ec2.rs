//! The `ec2` cloud driver (Amazon EC2 API through the AWS SDK).
//!
//! * create: `RunInstances` (one instance, the node's user-data script — which carries a
//!   one-time enrolment token, never a private key — tags: [`crate::cloud::tags`] plus `Name`),
//!   then `DescribeInstances` every `POLL_INTERVAL` until the instance is `running` with an
//!   address (public unless `USE_PRIVATE_IP`), at most `ADDRESS_TIMEOUT`; an instance that
//!   stops on the way or never gets there is terminated and the creation fails;
//! * delete: `TerminateInstances`;
//! * list: `DescribeInstances` filtered by this manager's and this cloud's tags;
//! * orphans: instances with those tags that the manager does not know are terminated when
//!   the manager starts ([`Cloud::reap_orphans`]).
//!
//! Settings: [`Ec2Settings`] from a cloud cfg file (`config/cloud/ec2.cfg`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use aws_sdk_ec2::types::{
    Filter, Instance, InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification,
};

use crate::cloud::{encode_user_data, node_tags, tags, Cloud, NodeRequest, Owner, ServiceNode};
use crate::cloudcfg::Ec2Settings;

/// RunInstances takes at most 16 KiB of user-data (before base64).
pub const USER_DATA_LIMIT: usize = 16 * 1024;

pub struct Ec2Cloud {
    name: String,
    settings: Ec2Settings,
    owner: Owner,
    client: aws_sdk_ec2::Client,
    nodes: Mutex<HashMap<String, ServiceNode>>,
}

/// An SDK error with its whole cause chain.
fn sdk_err<E: std::error::Error>(call: &str, e: E) -> anyhow::Error {
    anyhow::anyhow!(
        "EC2 {call}: {}",
        aws_sdk_ec2::error::DisplayErrorContext(&e)
    )
}

fn tag_value<'a>(i: &'a Instance, key: &str) -> Option<&'a str> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// The idempotency token of a node's RunInstances: its name, or the name's last 64
/// characters (the limit; the random part of a node name is at its end).
fn client_token(node_name: &str) -> &str {
    let n = node_name.len();
    if n <= 64 {
        node_name
    } else {
        let mut start = n - 64;
        while !node_name.is_char_boundary(start) {
            start += 1;
        }
        &node_name[start..]
    }
}

impl Ec2Cloud {
    /// Builds the SDK client (no request is made).
    pub async fn new(name: &str, settings: Ec2Settings, owner: Owner) -> Result<Self> {
        use aws_config::{BehaviorVersion, Region};
        use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(settings.region.clone()));
        if let Some(u) = &settings.endpoint {
            loader = loader.endpoint_url(u.clone());
        }
        if let (Some(a), Some(s)) = (&settings.access_key, &settings.secret_key) {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                a.clone(),
                s.clone(),
                None,
                None,
                "cps cloud cfg",
            ));
        }
        let conf = loader.load().await;
        Ok(Ec2Cloud {
            name: name.to_string(),
            settings,
            owner,
            client: aws_sdk_ec2::Client::new(&conf),
            nodes: Mutex::new(HashMap::new()),
        })
    }

    pub fn client(&self) -> &aws_sdk_ec2::Client {
        &self.client
    }

    /// The filters selecting this manager's instances in this cloud that are not gone.
    fn owner_filters(&self) -> Vec<Filter> {
        let f = |n: &str, v: &[&str]| {
            Filter::builder()
                .name(n)
                .set_values(Some(v.iter().map(|s| s.to_string()).collect()))
                .build()
        };
        vec![
            f(&format!("tag:{}", tags::MANAGER), &[&self.owner.manager_id]),
            f(&format!("tag:{}", tags::CLOUD), &[&self.name]),
            f(
                "instance-state-name",
                &["pending", "running", "stopping", "stopped"],
            ),
        ]
    }

    fn node_of(&self, i: &Instance, port: u16) -> Option<ServiceNode> {
        let vmid = i.instance_id()?.to_string();
        let private = i.private_ip_address().unwrap_or_default().to_string();
        let public = i.public_ip_address().unwrap_or_default().to_string();
        let ip = if self.settings.use_private_ip || public.is_empty() {
            private.clone()
        } else {
            public
        };
        Some(ServiceNode {
            id: format!("{}{vmid}", self.name),
            name: tag_value(i, tags::NODE).unwrap_or_default().to_string(),
            vmid,
            ip,
            private_ip: private,
            cloud: self.name.clone(),
            role: tag_value(i, tags::ROLE).unwrap_or("node").to_string(),
            port,
        })
    }

    async fn describe(&self, id: &str) -> Result<Option<Instance>> {
        let r = self
            .client
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| sdk_err("DescribeInstances", e))?;
        Ok(r.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(id))
            .cloned())
    }

    /// Polls until the instance runs and has the address the manager uses.
    async fn wait_address(&self, id: &str, port: u16) -> Result<ServiceNode> {
        let start = Instant::now();
        loop {
            if let Some(i) = self.describe(id).await? {
                let state = i.state().and_then(|s| s.name()).cloned();
                match state {
                    Some(InstanceStateName::Running) => {
                        if let Some(n) = self.node_of(&i, port).filter(|n| !n.ip.is_empty()) {
                            return Ok(n);
                        }
                    }
                    Some(InstanceStateName::Pending) | None => {}
                    Some(other) => bail!("instance {id} is {} before it ran", other.as_str()),
                }
            }
            if start.elapsed() >= self.settings.address_timeout {
                bail!(
                    "instance {id} not running with an address after {:?}",
                    self.settings.address_timeout
                );
            }
            tokio::time::sleep(self.settings.poll).await;
        }
    }

    async fn terminate(&self, ids: Vec<String>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.client
            .terminate_instances()
            .set_instance_ids(Some(ids))
            .send()
            .await
            .map_err(|e| sdk_err("TerminateInstances", e))?;
        Ok(())
    }

    /// Every instance of this manager in this cloud (pending, running, stopping, stopped).
    pub async fn owned_instances(&self) -> Result<Vec<Instance>> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let r = self
                .client
                .describe_instances()
                .set_filters(Some(self.owner_filters()))
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| sdk_err("DescribeInstances", e))?;
            out.extend(r.reservations().iter().flat_map(|r| r.instances()).cloned());
            match r.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }
}

#[async_trait]
impl Cloud for Ec2Cloud {
    fn cloud_name(&self) -> &str {
        &self.name
    }
    fn cloud_type(&self) -> &str {
        "ec2"
    }

    async fn create_node(&self, req: NodeRequest) -> Result<ServiceNode> {
        let script = req.config.render_script(&req.vars, "ec2")?;
        let user_data = encode_user_data(&script, USER_DATA_LIMIT)?;
        let mut spec = TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .tags(Tag::builder().key("Name").value(&req.vars.node_id).build());
        for (k, v) in node_tags(&self.owner, &self.name, &req) {
            spec = spec.tags(Tag::builder().key(k).value(v).build());
        }
        let s = &self.settings;
        let mut run = self
            .client
            .run_instances()
            .image_id(&s.image_id)
            .instance_type(InstanceType::from(s.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .user_data(user_data)
            .tag_specifications(spec.build())
            // Node names are unique: a retried request cannot start a second instance.
            .client_token(client_token(&req.vars.node_id))
            .set_key_name(s.key_name.clone())
            .set_subnet_id(s.subnet_id.clone());
        if !s.security_groups.is_empty() {
            run = run.set_security_groups(Some(s.security_groups.clone()));
        }
        if !s.security_group_ids.is_empty() {
            run = run.set_security_group_ids(Some(s.security_group_ids.clone()));
        }
        let r = run.send().await.map_err(|e| sdk_err("RunInstances", e))?;
        let id = r
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .context("RunInstances answered no instance")?
            .to_string();
        tracing::info!(
            "ec2 cloud {}: started instance {id} for node {} ({})",
            self.name,
            req.vars.node_id,
            s.source
        );
        let node = match self.wait_address(&id, req.vars.port).await {
            Ok(n) => n,
            Err(e) => {
                if let Err(t) = self.terminate(vec![id.clone()]).await {
                    tracing::warn!("terminating instance {id}: {t:#}");
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
        self.terminate(vec![node.vmid.clone()]).await?;
        self.nodes.lock().expect("nodes lock").remove(&node.vmid);
        tracing::info!("ec2 cloud {}: terminated {}", self.name, node.vmid);
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<ServiceNode>> {
        let known = self.nodes.lock().expect("nodes lock").clone();
        let mut v: Vec<ServiceNode> = self
            .owned_instances()
            .await?
            .iter()
            .filter_map(|i| {
                let id = i.instance_id()?;
                let port = known.get(id).map(|n| n.port).unwrap_or(0);
                self.node_of(i, port)
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    async fn reap_orphans(&self, known: &[ServiceNode]) -> Result<Vec<String>> {
        let orphans: Vec<String> = self
            .owned_instances()
            .await?
            .iter()
            .filter_map(|i| i.instance_id())
            .filter(|id| !known.iter().any(|n| n.cloud == self.name && n.vmid == *id))
            .map(str::to_string)
            .collect();
        if !orphans.is_empty() {
            tracing::warn!(
                "ec2 cloud {}: terminating {} orphan instance(s) of manager {}: {}",
                self.name,
                orphans.len(),
                self.owner.manager_id,
                orphans.join(", ")
            );
            self.terminate(orphans.clone()).await?;
        }
        Ok(orphans)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_token_fits_64_chars() {
        assert_eq!(
            super::client_token("dep-u1-a1-s1-hw-00ff"),
            "dep-u1-a1-s1-hw-00ff"
        );
        let long = format!("{}-u1-a1-s1-helloworld-0a1b2c3d", "d".repeat(80));
        let t = super::client_token(&long);
        assert_eq!(t.len(), 64);
        assert!(t.ends_with("-helloworld-0a1b2c3d"));
    }
}
