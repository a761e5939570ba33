//! Certificate enrolment through one-time tokens.
//!
//! 1. When the manager creates a node it mints a token (32 random bytes, hex) bound to the node
//!    name and the identity the node will get (role, user, application), valid for `TOKEN_TTL`
//!    seconds. The token and the CA certificate (public) go into the node's context.
//! 2. At boot the node generates its own ECDSA key and a CSR (`cps enroll`, or the agent itself
//!    when its config has `ENROLL_URL`/`ENROLL_TOKEN` and no certificate yet) and POSTs
//!    `{"token", "node_id", "csr"}` to the manager's enrolment endpoint (`https://<manager>:
//!    <ENROLL_PORT>/enroll`, server-authenticated TLS; the node checks the manager's certificate
//!    against the CA certificate from its context).
//! 3. The manager removes the token (single use, even when the request then fails), checks expiry
//!    and node name, signs the CSR's public key with the identity bound to the token (the CSR's
//!    subject is ignored) and returns `{"cert", "ca_cert"}`.
//!
//! The private key never leaves the node.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::client::RpcClient;
use crate::pki::{self, Ca, CertPaths, Identity, Validity};

struct Pending {
    node_id: String,
    identity: Identity,
    expires: Instant,
}

pub struct Enroller {
    ca: Ca,
    ttl: Duration,
    validity_days: i64,
    tokens: Mutex<HashMap<String, Pending>>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct EnrolRequest {
    pub token: String,
    pub node_id: String,
    pub csr: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct EnrolAnswer {
    pub cert: String,
    pub ca_cert: String,
}

impl Enroller {
    pub fn new(ca: Ca, ttl: Duration, validity_days: i64) -> Self {
        Enroller {
            ca,
            ttl,
            validity_days,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    pub fn ca_cert_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// A fresh single-use token for `node_id`.
    pub fn mint(&self, node_id: &str, identity: Identity) -> String {
        let token = pki::random_hex(32);
        let mut t = self.tokens.lock().expect("token lock");
        let now = Instant::now();
        t.retain(|_, p| p.expires > now);
        t.insert(
            token.clone(),
            Pending {
                node_id: node_id.to_string(),
                identity,
                expires: now + self.ttl,
            },
        );
        token
    }

    /// Registers a token chosen elsewhere (a Nutshell's user token, written by
    /// user-data), valid for `ttl`. Single use like the others.
    pub fn add_token(&self, token: &str, node_id: &str, identity: Identity, ttl: Duration) {
        self.tokens.lock().expect("token lock").insert(
            token.to_string(),
            Pending {
                node_id: node_id.to_string(),
                identity,
                expires: Instant::now() + ttl,
            },
        );
    }

    /// Forgets the tokens of a node (node deleted before it enrolled).
    pub fn revoke_node(&self, node_id: &str) {
        self.tokens
            .lock()
            .expect("token lock")
            .retain(|_, p| p.node_id != node_id);
    }

    /// Redeems a token and signs the CSR. The token is consumed whatever happens next.
    pub fn redeem(&self, req: &EnrolRequest) -> Result<EnrolAnswer> {
        let pending = self
            .tokens
            .lock()
            .expect("token lock")
            .remove(&req.token)
            .ok_or_else(|| anyhow!("unknown or already used token"))?;
        if pending.expires <= Instant::now() {
            bail!("token expired");
        }
        if pending.node_id != req.node_id {
            bail!("token not issued for node '{}'", req.node_id);
        }
        let cert = self.ca.sign_csr(
            &req.csr,
            &pending.identity,
            &pending.node_id,
            Validity::days(self.validity_days),
        )?;
        Ok(EnrolAnswer {
            cert,
            ca_cert: self.ca.cert_pem.clone(),
        })
    }

    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new().route(
            "/enroll",
            axum::routing::post(move |body: axum::body::Bytes| {
                let me = self.clone();
                async move {
                    let req: EnrolRequest = match serde_json::from_slice(&body) {
                        Ok(r) => r,
                        Err(e) => {
                            return (
                                StatusCode::BAD_REQUEST,
                                axum::Json(json!({"error": format!("bad request: {e}")})),
                            )
                                .into_response()
                        }
                    };
                    match me.redeem(&req) {
                        Ok(a) => {
                            tracing::info!("enrolled node {}", req.node_id);
                            axum::Json(json!(a)).into_response()
                        }
                        Err(e) => {
                            tracing::warn!("enrolment of node {} refused: {e:#}", req.node_id);
                            (
                                StatusCode::FORBIDDEN,
                                axum::Json(json!({"error": format!("{e:#}")})),
                            )
                                .into_response()
                        }
                    }
                }
            }),
        )
    }
}

/// Node side: generate a key and CSR, redeem `token` at `url`, write `cert.pem`, `key.pem`,
/// `ca_cert.pem` into `cert_dir`. `ca_pem` authenticates the manager.
pub async fn enroll(
    url: &str,
    token: &str,
    node_id: &str,
    ca_pem: &[u8],
    cert_dir: &Path,
) -> Result<Identity> {
    let u = url::Url::parse(url).with_context(|| format!("bad enrolment URL '{url}'"))?;
    if u.scheme() != "https" {
        bail!("enrolment URL must be https");
    }
    let host = u
        .host_str()
        .ok_or_else(|| anyhow!("enrolment URL without host"))?;
    let port = u.port_or_known_default().unwrap_or(443);
    let tls = pki::anonymous_client_config(ca_pem, None)?;
    let client = RpcClient::new(tls, format!("{host}:{port}"));
    let (key_pem, csr_pem) = pki::generate_key_and_csr(node_id)?;
    let body = serde_json::to_vec(&EnrolRequest {
        token: token.to_string(),
        node_id: node_id.to_string(),
        csr: csr_pem,
    })?;
    let r = client
        .raw(
            "POST",
            u.path(),
            &[("content-type", "application/json")],
            body,
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let v = r.json().map_err(|e| anyhow!("{e}"))?;
    if r.status != StatusCode::OK {
        bail!(
            "enrolment refused (HTTP {}): {}",
            r.status.as_u16(),
            v.get("error").and_then(|e| e.as_str()).unwrap_or("")
        );
    }
    let a: EnrolAnswer = serde_json::from_value(v).context("bad enrolment answer")?;
    std::fs::create_dir_all(cert_dir)?;
    let paths = CertPaths::in_dir(cert_dir);
    pki::write_file(&paths.key, &key_pem, 0o600)?;
    pki::write_file(&paths.cert, &a.cert, 0o644)?;
    pki::write_file(&paths.ca, &a.ca_cert, 0o644)?;
    paths.identity()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Role;

    #[test]
    fn tokens_are_single_use_bound_and_expire() {
        let ca = Ca::generate("t", 1).unwrap();
        let e = Enroller::new(ca, Duration::from_secs(60), 1);
        let id = Identity {
            role: Role::Agent,
            uid: 1,
            app: 2,
        };
        let (_, csr) = pki::generate_key_and_csr("n1").unwrap();
        let t = e.mint("n1", id.clone());
        let wrong = EnrolRequest {
            token: t.clone(),
            node_id: "n2".into(),
            csr: csr.clone(),
        };
        assert!(e
            .redeem(&wrong)
            .unwrap_err()
            .to_string()
            .contains("not issued"));
        // consumed by the failed attempt
        let ok = EnrolRequest {
            token: t,
            node_id: "n1".into(),
            csr: csr.clone(),
        };
        assert!(e.redeem(&ok).unwrap_err().to_string().contains("unknown"));
        let t = e.mint("n1", id.clone());
        let ok = EnrolRequest {
            token: t,
            node_id: "n1".into(),
            csr: csr.clone(),
        };
        assert!(e.redeem(&ok).is_ok());
        assert!(e.redeem(&ok).is_err(), "second use refused");
        let e = Enroller::new(Ca::generate("t", 1).unwrap(), Duration::from_millis(1), 1);
        let t = e.mint("n1", id);
        std::thread::sleep(Duration::from_millis(5));
        let r = EnrolRequest {
            token: t,
            node_id: "n1".into(),
            csr,
        };
        assert!(e.redeem(&r).is_err());
    }
}
