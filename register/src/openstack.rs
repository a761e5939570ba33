//! OpenStack: Keystone v3 authentication and Glance v2 image upload.

use crate::env_flag;
use crate::error::RegisterError;
use crate::image::ImageInfo;
use crate::progress::Progress;
use bytes::Bytes;
use futures::StreamExt;
use md5::Md5;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256, Sha512};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Environment variable that flips one byte of the uploaded stream (not of our
/// digests), so the mismatch path can be tested.
pub const CORRUPT_UPLOAD_ENV: &str = "MKIMAGE_TEST_CORRUPT_UPLOAD";

/// How to authenticate with Keystone v3.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthMethod {
    Password {
        username: String,
        password: String,
        user_domain: Domain,
        project_name: String,
        project_domain: Domain,
    },
    ApplicationCredential {
        id: String,
        secret: String,
    },
}

impl std::fmt::Debug for AuthMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthMethod::Password {
                username,
                project_name,
                ..
            } => f
                .debug_struct("Password")
                .field("username", username)
                .field("project_name", project_name)
                .finish_non_exhaustive(),
            AuthMethod::ApplicationCredential { id, .. } => f
                .debug_struct("ApplicationCredential")
                .field("id", id)
                .finish_non_exhaustive(),
        }
    }
}

/// A Keystone domain, by name or by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    Name(String),
    Id(String),
}

impl Domain {
    fn json(&self) -> Value {
        match self {
            Domain::Name(n) => json!({ "name": n }),
            Domain::Id(i) => json!({ "id": i }),
        }
    }
    fn pick(name: Option<String>, id: Option<String>, fallback: Option<&Domain>) -> Domain {
        match (name, id) {
            (Some(n), _) => Domain::Name(n),
            (None, Some(i)) => Domain::Id(i),
            (None, None) => fallback
                .cloned()
                .unwrap_or_else(|| Domain::Id("default".into())),
        }
    }
}

/// Where and how to authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub auth_url: String,
    pub method: AuthMethod,
    pub region: Option<String>,
    /// Catalog interface: public (default), internal or admin.
    pub interface: Option<String>,
}

impl AuthConfig {
    /// From `OS_*` variables of the process environment.
    pub fn from_env() -> Result<AuthConfig, RegisterError> {
        AuthConfig::from_env_map(&std::env::vars().collect())
    }

    /// From a map of `OS_*` variables.
    pub fn from_env_map(env: &HashMap<String, String>) -> Result<AuthConfig, RegisterError> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let auth_url = get("OS_AUTH_URL").ok_or_else(|| {
            RegisterError::Config(
                "no OpenStack credentials: set OS_CLOUD (clouds.yaml) or OS_AUTH_URL and friends"
                    .into(),
            )
        })?;
        let default_domain = get("OS_DEFAULT_DOMAIN")
            .map(Domain::Id)
            .or_else(|| get("OS_DOMAIN_NAME").map(Domain::Name));
        let method = match (
            get("OS_APPLICATION_CREDENTIAL_ID"),
            get("OS_APPLICATION_CREDENTIAL_SECRET"),
        ) {
            (Some(id), Some(secret)) => AuthMethod::ApplicationCredential { id, secret },
            _ => AuthMethod::Password {
                username: get("OS_USERNAME").ok_or_else(|| {
                    RegisterError::Config("OS_AUTH_URL is set but OS_USERNAME is not".into())
                })?,
                password: get("OS_PASSWORD").ok_or_else(|| {
                    RegisterError::Config("OS_AUTH_URL is set but OS_PASSWORD is not".into())
                })?,
                user_domain: Domain::pick(
                    get("OS_USER_DOMAIN_NAME"),
                    get("OS_USER_DOMAIN_ID"),
                    default_domain.as_ref(),
                ),
                project_name: get("OS_PROJECT_NAME")
                    .or_else(|| get("OS_TENANT_NAME"))
                    .ok_or_else(|| {
                        RegisterError::Config(
                            "OS_AUTH_URL is set but OS_PROJECT_NAME is not".into(),
                        )
                    })?,
                project_domain: Domain::pick(
                    get("OS_PROJECT_DOMAIN_NAME"),
                    get("OS_PROJECT_DOMAIN_ID"),
                    default_domain.as_ref(),
                ),
            },
        };
        Ok(AuthConfig {
            auth_url,
            method,
            region: get("OS_REGION_NAME"),
            interface: get("OS_INTERFACE"),
        })
    }

    /// The usual clouds.yaml search path: ./clouds.yaml,
    /// ~/.config/openstack/clouds.yaml, /etc/openstack/clouds.yaml
    /// (`OS_CLIENT_CONFIG_FILE` first when set).
    pub fn clouds_yaml_candidates() -> Vec<PathBuf> {
        let mut v = vec![];
        if let Ok(f) = std::env::var("OS_CLIENT_CONFIG_FILE") {
            v.push(PathBuf::from(f));
        }
        v.push(PathBuf::from("clouds.yaml"));
        if let Some(home) = std::env::var_os("HOME") {
            v.push(Path::new(&home).join(".config/openstack/clouds.yaml"));
        }
        v.push(PathBuf::from("/etc/openstack/clouds.yaml"));
        v
    }

    /// Reads cloud `cloud` from a clouds.yaml file.
    pub fn from_clouds_yaml(path: &Path, cloud: &str) -> Result<AuthConfig, RegisterError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegisterError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| {
            RegisterError::Config(format!("{} is not valid YAML: {e}", path.display()))
        })?;
        let c = doc
            .get("clouds")
            .and_then(|c| c.get(cloud))
            .ok_or_else(|| {
                RegisterError::Config(format!("{} has no cloud {cloud:?}", path.display()))
            })?;
        let s = |v: Option<&serde_yaml::Value>, k: &str| -> Option<String> {
            v.and_then(|v| v.get(k)).and_then(|x| match x {
                serde_yaml::Value::String(s) => Some(s.clone()),
                serde_yaml::Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
        };
        let auth = c.get("auth");
        let auth_url = s(auth, "auth_url").ok_or_else(|| {
            RegisterError::Config(format!(
                "cloud {cloud:?} in {} has no auth.auth_url",
                path.display()
            ))
        })?;
        let auth_type = s(Some(c), "auth_type").unwrap_or_default();
        let method = if auth_type.contains("applicationcredential")
            || s(auth, "application_credential_id").is_some()
        {
            AuthMethod::ApplicationCredential {
                id: s(auth, "application_credential_id").ok_or_else(|| {
                    RegisterError::Config(format!("cloud {cloud:?}: no application_credential_id"))
                })?,
                secret: s(auth, "application_credential_secret").ok_or_else(|| {
                    RegisterError::Config(format!(
                        "cloud {cloud:?}: no application_credential_secret"
                    ))
                })?,
            }
        } else {
            let default_domain = s(auth, "domain_id")
                .map(Domain::Id)
                .or_else(|| s(auth, "domain_name").map(Domain::Name));
            AuthMethod::Password {
                username: s(auth, "username").ok_or_else(|| {
                    RegisterError::Config(format!("cloud {cloud:?}: no auth.username"))
                })?,
                password: s(auth, "password").ok_or_else(|| {
                    RegisterError::Config(format!("cloud {cloud:?}: no auth.password"))
                })?,
                user_domain: Domain::pick(
                    s(auth, "user_domain_name"),
                    s(auth, "user_domain_id"),
                    default_domain.as_ref(),
                ),
                project_name: s(auth, "project_name")
                    .or_else(|| s(auth, "tenant_name"))
                    .ok_or_else(|| {
                        RegisterError::Config(format!("cloud {cloud:?}: no auth.project_name"))
                    })?,
                project_domain: Domain::pick(
                    s(auth, "project_domain_name"),
                    s(auth, "project_domain_id"),
                    default_domain.as_ref(),
                ),
            }
        };
        Ok(AuthConfig {
            auth_url,
            method,
            region: s(Some(c), "region_name"),
            interface: s(Some(c), "interface"),
        })
    }

    /// Resolves the configuration as the OpenStack clients do: explicit cloud
    /// name (or `OS_CLOUD`) from clouds.yaml, else the `OS_*` variables.
    pub fn resolve(opts: &OpenStackOptions) -> Result<AuthConfig, RegisterError> {
        if let Some(a) = &opts.auth {
            return Ok(a.clone());
        }
        let cloud = opts
            .cloud
            .clone()
            .or_else(|| std::env::var("OS_CLOUD").ok().filter(|c| !c.is_empty()));
        match cloud {
            Some(cloud) => {
                let candidates = match &opts.clouds_file {
                    Some(f) => vec![f.clone()],
                    None => AuthConfig::clouds_yaml_candidates(),
                };
                for p in &candidates {
                    if p.is_file() {
                        return AuthConfig::from_clouds_yaml(p, &cloud);
                    }
                }
                Err(RegisterError::Config(format!(
                    "cloud {cloud:?} requested but no clouds.yaml found (looked at {})",
                    candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
            None => AuthConfig::from_env(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct OpenStackOptions {
    /// Cloud name in clouds.yaml (else `OS_CLOUD`; else `OS_*` variables).
    pub cloud: Option<String>,
    /// clouds.yaml to read instead of the search path.
    pub clouds_file: Option<PathBuf>,
    /// Explicit authentication (beats `cloud` and the environment).
    pub auth: Option<AuthConfig>,
    /// Region of the image endpoint (else from the configuration).
    pub region: Option<String>,
    /// Catalog interface (else from the configuration, else public).
    pub interface: Option<String>,
    /// Glance visibility (private, shared, community, public); None = Glance default.
    pub visibility: Option<String>,
    pub os_distro: String,
    /// More image properties.
    pub properties: BTreeMap<String, String>,
    /// Delete an existing active image of the same name once the new one is verified.
    pub replace: bool,
    pub wait_timeout: Duration,
    pub poll_interval: Duration,
    /// Test-only: flip one byte of the uploaded stream (also env
    /// `MKIMAGE_TEST_CORRUPT_UPLOAD=1`).
    pub corrupt_upload: bool,
}

impl Default for OpenStackOptions {
    fn default() -> Self {
        OpenStackOptions {
            cloud: None,
            clouds_file: None,
            auth: None,
            region: None,
            interface: None,
            visibility: None,
            os_distro: "debian".into(),
            properties: BTreeMap::new(),
            replace: false,
            wait_timeout: Duration::from_secs(3600),
            poll_interval: Duration::from_millis(500),
            corrupt_upload: false,
        }
    }
}

/// What Glance stored; goes into the manifest's `registrations`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GlanceRegistration {
    /// Always `"openstack"`.
    pub cloud: String,
    pub name: String,
    pub image_id: String,
    /// The Glance endpoint used.
    pub endpoint: String,
    pub region: Option<String>,
    pub status: String,
    /// MD5 hex reported by Glance (equal to ours).
    pub checksum: Option<String>,
    pub os_hash_algo: Option<String>,
    pub os_hash_value: Option<String>,
    pub size: u64,
    pub disk_format: String,
    /// True when an existing active image of the same name was reported.
    pub existing: bool,
    /// Images deleted because of `replace`.
    pub replaced: Vec<String>,
    pub build_id: String,
}

/// A Keystone token with the image endpoint picked from its catalog.
pub struct Session {
    pub token: String,
    pub image_endpoint: String,
    pub region: Option<String>,
    http: reqwest::Client,
}

fn http_client() -> Result<reqwest::Client, RegisterError> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| RegisterError::Config(format!("cannot build the HTTP client: {e}")))
}

fn identity_v3(auth_url: &str) -> String {
    let u = auth_url.trim_end_matches('/');
    if u.ends_with("/v3") {
        u.to_string()
    } else {
        format!("{u}/v3")
    }
}

/// Authenticates with Keystone v3 and finds the image service endpoint.
pub async fn authenticate(
    auth: &AuthConfig,
    region: Option<&str>,
    interface: Option<&str>,
) -> Result<Session, RegisterError> {
    let http = http_client()?;
    let url = format!("{}/auth/tokens", identity_v3(&auth.auth_url));
    let body = match &auth.method {
        AuthMethod::Password {
            username,
            password,
            user_domain,
            project_name,
            project_domain,
        } => json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": username, "domain": user_domain.json(), "password": password}}},
            "scope": {"project": {"name": project_name, "domain": project_domain.json()}}
        }}),
        AuthMethod::ApplicationCredential { id, secret } => json!({"auth": {
            "identity": {"methods": ["application_credential"],
                "application_credential": {"id": id, "secret": secret}}
        }}),
    };
    let fail = |message: String| RegisterError::Auth {
        auth_url: auth.auth_url.clone(),
        message,
    };
    let resp = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(|e| fail(format!("POST {url}: {e}")))?;
    let status = resp.status();
    let token = resp
        .headers()
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(fail(format!("POST {url}: HTTP {status}: {}", text.trim())));
    }
    let token = token.ok_or_else(|| fail("the answer has no X-Subject-Token".into()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| fail(format!("the token answer is not JSON: {e}")))?;
    let region = region.map(str::to_string).or_else(|| auth.region.clone());
    let interface = interface
        .or(auth.interface.as_deref())
        .unwrap_or("public")
        .trim_end_matches("URL")
        .to_string();
    let image_endpoint =
        find_endpoint(&v, "image", &interface, region.as_deref()).ok_or_else(|| {
            fail(format!(
                "the token's catalog has no {interface} image endpoint{}",
                region
                    .as_deref()
                    .map(|r| format!(" in region {r}"))
                    .unwrap_or_default()
            ))
        })?;
    Ok(Session {
        token,
        image_endpoint,
        region,
        http,
    })
}

/// The URL of a service endpoint in a Keystone v3 token answer.
pub fn find_endpoint(
    token: &Value,
    service_type: &str,
    interface: &str,
    region: Option<&str>,
) -> Option<String> {
    let catalog = token.get("token")?.get("catalog")?.as_array()?;
    for svc in catalog {
        if svc.get("type").and_then(Value::as_str) != Some(service_type) {
            continue;
        }
        for ep in svc.get("endpoints")?.as_array()? {
            if ep.get("interface").and_then(Value::as_str) != Some(interface) {
                continue;
            }
            if let Some(r) = region {
                let er = ep
                    .get("region_id")
                    .or_else(|| ep.get("region"))
                    .and_then(Value::as_str);
                if er != Some(r) {
                    continue;
                }
            }
            let url = ep.get("url")?.as_str()?.trim_end_matches('/');
            let url = url
                .strip_suffix("/v2")
                .or_else(|| url.strip_suffix("/v2.0"))
                .unwrap_or(url);
            return Some(url.to_string());
        }
    }
    None
}

impl Session {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.image_endpoint)
    }

    async fn call(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, String), RegisterError> {
        let resp = req
            .header("X-Auth-Token", &self.token)
            .send()
            .await
            .map_err(|e| RegisterError::api(what, e))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(RegisterError::api(
                what,
                format!("HTTP {status}: {}", text.trim()),
            ));
        }
        Ok((status, text))
    }

    async fn json(&self, what: &str, req: reqwest::RequestBuilder) -> Result<Value, RegisterError> {
        let (_, text) = self.call(what, req).await?;
        serde_json::from_str(&text)
            .map_err(|e| RegisterError::api(what, format!("the answer is not JSON: {e}")))
    }

    pub async fn get_image(&self, id: &str) -> Result<Value, RegisterError> {
        self.json(
            &format!("GET /v2/images/{id}"),
            self.http.get(self.url(&format!("/v2/images/{id}"))),
        )
        .await
    }

    pub async fn delete_image(&self, id: &str) -> Result<(), RegisterError> {
        self.call(
            &format!("DELETE /v2/images/{id}"),
            self.http.delete(self.url(&format!("/v2/images/{id}"))),
        )
        .await
        .map(|_| ())
    }

    /// Images with exactly this name.
    pub async fn images_named(&self, name: &str) -> Result<Vec<Value>, RegisterError> {
        let v = self
            .json(
                "GET /v2/images?name=",
                self.http
                    .get(self.url("/v2/images"))
                    .query(&[("name", name), ("limit", "100")]),
            )
            .await?;
        Ok(v.get("images")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i.get("name").and_then(Value::as_str) == Some(name))
            .collect())
    }
}

fn str_field(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

fn record(
    image: &ImageInfo,
    s: &Session,
    v: &Value,
    existing: bool,
    replaced: Vec<String>,
) -> GlanceRegistration {
    GlanceRegistration {
        cloud: "openstack".into(),
        name: image.name.clone(),
        image_id: str_field(v, "id").unwrap_or_default(),
        endpoint: s.image_endpoint.clone(),
        region: s.region.clone(),
        status: str_field(v, "status").unwrap_or_default(),
        checksum: str_field(v, "checksum"),
        os_hash_algo: str_field(v, "os_hash_algo"),
        os_hash_value: str_field(v, "os_hash_value"),
        size: v.get("size").and_then(Value::as_u64).unwrap_or(0),
        disk_format: str_field(v, "disk_format").unwrap_or_else(|| image.disk_format.clone()),
        existing,
        replaced,
        build_id: image.build_id.clone(),
    }
}

/// Digests computed while streaming the file to Glance.
#[derive(Default)]
struct StreamDigests {
    md5: Md5,
    sha256: Sha256,
    sha512: Sha512,
    size: u64,
}

/// Uploads `image` to Glance and checks what Glance stored.
pub async fn register_openstack(
    image: &ImageInfo,
    opts: &OpenStackOptions,
    progress: &dyn Progress,
) -> Result<GlanceRegistration, RegisterError> {
    image.validate()?;
    let auth = AuthConfig::resolve(opts)?;
    let s = authenticate(&auth, opts.region.as_deref(), opts.interface.as_deref()).await?;

    let existing: Vec<Value> = s
        .images_named(&image.name)
        .await?
        .into_iter()
        .filter(|i| i.get("status").and_then(Value::as_str) == Some("active"))
        .collect();
    if let Some(old) = existing.first() {
        if !opts.replace {
            tracing::info!(image = ?str_field(old, "id"), "an active image of this name exists; not uploading again");
            return Ok(record(image, &s, old, true, vec![]));
        }
    }

    // Create.
    let mut body = serde_json::Map::new();
    body.insert("name".into(), json!(image.name));
    body.insert("disk_format".into(), json!(image.disk_format));
    body.insert("container_format".into(), json!("bare"));
    body.insert("architecture".into(), json!(image.arch));
    body.insert("hw_disk_bus".into(), json!("virtio"));
    body.insert("os_distro".into(), json!(opts.os_distro));
    body.insert("mkimage_build_id".into(), json!(image.build_id));
    body.insert("tags".into(), json!(["mkimage"]));
    if let Some(d) = &image.description {
        body.insert("description".into(), json!(d));
    }
    if let Some(v) = &opts.visibility {
        body.insert("visibility".into(), json!(v));
    }
    for (k, v) in &opts.properties {
        body.insert(k.clone(), json!(v));
    }
    let created = s
        .json(
            "POST /v2/images",
            s.http.post(s.url("/v2/images")).json(&Value::Object(body)),
        )
        .await?;
    let id = str_field(&created, "id")
        .ok_or_else(|| RegisterError::api("POST /v2/images", "the answer has no id"))?;
    tracing::info!(image = %id, "Glance image created");

    match upload_and_verify(&s, image, opts, progress, &id).await {
        Ok(v) => {
            let mut replaced = vec![];
            for old in &existing {
                if let Some(old_id) = str_field(old, "id") {
                    match s.delete_image(&old_id).await {
                        Ok(()) => replaced.push(old_id),
                        Err(e) => {
                            tracing::warn!(image = %old_id, error = %e, "could not delete the replaced image")
                        }
                    }
                }
            }
            Ok(record(image, &s, &v, false, replaced))
        }
        Err(e) => {
            let (cleaned_up, left_behind) = match s.delete_image(&id).await {
                Ok(()) => (vec![format!("Glance image {id}")], vec![]),
                Err(de) => (vec![], vec![format!("Glance image {id} ({de})")]),
            };
            Err(RegisterError::CleanedUp {
                source: Box::new(e),
                cleaned_up,
                left_behind,
            })
        }
    }
}

async fn upload_and_verify(
    s: &Session,
    image: &ImageInfo,
    opts: &OpenStackOptions,
    progress: &dyn Progress,
    id: &str,
) -> Result<Value, RegisterError> {
    let file = tokio::fs::File::open(&image.path)
        .await
        .map_err(|source| RegisterError::Io {
            path: image.path.clone(),
            source,
        })?;
    let size = file
        .metadata()
        .await
        .map_err(|source| RegisterError::Io {
            path: image.path.clone(),
            source,
        })?
        .len();

    let digests = Arc::new(Mutex::new(StreamDigests::default()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let mut corrupt = opts.corrupt_upload || env_flag(CORRUPT_UPLOAD_ENV);
    let d = digests.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(move |chunk| {
        let chunk: Bytes = chunk?;
        {
            let mut d = d.lock().expect("digest lock");
            d.md5.update(&chunk);
            d.sha256.update(&chunk);
            d.sha512.update(&chunk);
            d.size += chunk.len() as u64;
        }
        let _ = tx.send(chunk.len() as u64);
        if corrupt && !chunk.is_empty() {
            corrupt = false;
            let mut v = chunk.to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 0x01;
            return Ok::<Bytes, std::io::Error>(Bytes::from(v));
        }
        Ok(chunk)
    });

    progress.start(&format!("Glance image {id}"), size);
    let what = format!("PUT /v2/images/{id}/file");
    let upload = s
        .http
        .put(s.url(&format!("/v2/images/{id}/file")))
        .header("X-Auth-Token", &s.token)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Length", size.to_string())
        .body(reqwest::Body::wrap_stream(stream))
        .send();
    tokio::pin!(upload);
    let resp = loop {
        tokio::select! {
            r = &mut upload => break r,
            Some(n) = rx.recv() => progress.advance(n),
        }
    };
    while let Ok(n) = rx.try_recv() {
        progress.advance(n);
    }
    progress.finish();
    let resp = resp.map_err(|e| RegisterError::api(&what, e))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(RegisterError::api(
            &what,
            format!("HTTP {status}: {}", text.trim()),
        ));
    }

    let (md5, sha256, sha512, sent) = {
        let mut d = digests.lock().expect("digest lock");
        let d = std::mem::take(&mut *d);
        (
            hex::encode(d.md5.finalize()),
            hex::encode(d.sha256.finalize()),
            hex::encode(d.sha512.finalize()),
            d.size,
        )
    };
    if sent != size {
        return Err(RegisterError::Integrity {
            what: format!("bytes streamed from {}", image.path.display()),
            expected: size.to_string(),
            actual: sent.to_string(),
        });
    }
    // The file is still what the build recorded.
    for (what, want, got) in [
        ("MD5", &image.md5, &md5),
        ("SHA-256", &image.sha256, &sha256),
    ] {
        if let Some(want) = want {
            if !want.eq_ignore_ascii_case(got) {
                return Err(RegisterError::Integrity {
                    what: format!("{what} of {} vs the build manifest", image.path.display()),
                    expected: want.clone(),
                    actual: got.clone(),
                });
            }
        }
    }

    // Wait for active.
    let start = Instant::now();
    let v = loop {
        let v = s.get_image(id).await?;
        match v.get("status").and_then(Value::as_str) {
            Some("active") => break v,
            Some(st @ ("killed" | "deleted" | "pending_delete")) => {
                return Err(RegisterError::api(
                    &format!("GET /v2/images/{id}"),
                    format!("the image went to status {st}"),
                ))
            }
            _ => {}
        }
        if start.elapsed() > opts.wait_timeout {
            return Err(RegisterError::Timeout {
                what: format!("Glance image {id} to become active"),
                seconds: opts.wait_timeout.as_secs(),
            });
        }
        tokio::time::sleep(opts.poll_interval).await;
    };

    // What Glance computed must be what we sent.
    let glance_size = v.get("size").and_then(Value::as_u64);
    if glance_size != Some(size) {
        return Err(RegisterError::Integrity {
            what: format!("size Glance stored for image {id}"),
            expected: size.to_string(),
            actual: format!("{glance_size:?}"),
        });
    }
    let checksum = str_field(&v, "checksum");
    let algo = str_field(&v, "os_hash_algo");
    let hash = str_field(&v, "os_hash_value");
    if checksum.is_none() && hash.is_none() {
        return Err(RegisterError::Integrity {
            what: format!("checksums of Glance image {id}"),
            expected: "checksum or os_hash_value".into(),
            actual: "none reported".into(),
        });
    }
    if let Some(c) = &checksum {
        if !c.eq_ignore_ascii_case(&md5) {
            return Err(RegisterError::Integrity {
                what: format!("MD5 checksum Glance reports for image {id}"),
                expected: md5,
                actual: c.clone(),
            });
        }
    }
    if let (Some(a), Some(h)) = (&algo, &hash) {
        let ours = match a.as_str() {
            "sha512" => Some(&sha512),
            "sha256" => Some(&sha256),
            _ => None,
        };
        match ours {
            Some(ours) if !ours.eq_ignore_ascii_case(h) => {
                return Err(RegisterError::Integrity {
                    what: format!("{a} os_hash_value Glance reports for image {id}"),
                    expected: ours.clone(),
                    actual: h.clone(),
                })
            }
            Some(_) => {}
            None => {
                tracing::warn!(algo = %a, "Glance hashes with an algorithm we do not compute; only the MD5 was compared")
            }
        }
    }
    tracing::info!(image = %id, "Glance image active; checksums match");
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn password_auth_from_env() {
        let a = AuthConfig::from_env_map(&env(&[
            ("OS_AUTH_URL", "https://keystone.example:5000"),
            ("OS_USERNAME", "u"),
            ("OS_PASSWORD", "p"),
            ("OS_PROJECT_NAME", "proj"),
            ("OS_USER_DOMAIN_NAME", "Default"),
            ("OS_PROJECT_DOMAIN_ID", "default"),
            ("OS_REGION_NAME", "R1"),
        ]))
        .unwrap();
        assert_eq!(a.region.as_deref(), Some("R1"));
        match a.method {
            AuthMethod::Password {
                username,
                user_domain,
                project_name,
                project_domain,
                ..
            } => {
                assert_eq!(username, "u");
                assert_eq!(user_domain, Domain::Name("Default".into()));
                assert_eq!(project_name, "proj");
                assert_eq!(project_domain, Domain::Id("default".into()));
            }
            m => panic!("{m:?}"),
        }
        assert_eq!(identity_v3(&a.auth_url), "https://keystone.example:5000/v3");
        assert_eq!(identity_v3("http://k/v3/"), "http://k/v3");
    }

    #[test]
    fn application_credential_wins_and_missing_values_are_named() {
        let a = AuthConfig::from_env_map(&env(&[
            ("OS_AUTH_URL", "http://k/v3"),
            ("OS_APPLICATION_CREDENTIAL_ID", "id1"),
            ("OS_APPLICATION_CREDENTIAL_SECRET", "s1"),
            ("OS_USERNAME", "ignored"),
        ]))
        .unwrap();
        assert!(
            matches!(a.method, AuthMethod::ApplicationCredential { ref id, .. } if id == "id1")
        );
        let e = AuthConfig::from_env_map(&env(&[("OS_AUTH_URL", "http://k")])).unwrap_err();
        assert!(e.to_string().contains("OS_USERNAME"), "{e}");
        let e = AuthConfig::from_env_map(&env(&[])).unwrap_err();
        assert!(e.to_string().contains("OS_CLOUD"), "{e}");
    }

    #[test]
    fn clouds_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("clouds.yaml");
        std::fs::write(
            &p,
            "clouds:\n  a:\n    auth:\n      auth_url: http://k:5000\n      username: u\n      password: 123\n      project_name: p\n      domain_name: D\n    region_name: R\n  b:\n    auth_type: v3applicationcredential\n    auth:\n      auth_url: http://k:5000/v3\n      application_credential_id: ID\n      application_credential_secret: S\n",
        )
        .unwrap();
        let a = AuthConfig::from_clouds_yaml(&p, "a").unwrap();
        assert_eq!(a.region.as_deref(), Some("R"));
        match a.method {
            AuthMethod::Password {
                password,
                user_domain,
                ..
            } => {
                assert_eq!(password, "123");
                assert_eq!(user_domain, Domain::Name("D".into()));
            }
            m => panic!("{m:?}"),
        }
        let b = AuthConfig::from_clouds_yaml(&p, "b").unwrap();
        assert_eq!(
            b.method,
            AuthMethod::ApplicationCredential {
                id: "ID".into(),
                secret: "S".into()
            }
        );
        assert!(AuthConfig::from_clouds_yaml(&p, "c")
            .unwrap_err()
            .to_string()
            .contains("no cloud"));
    }

    #[test]
    fn endpoint_from_catalog() {
        let tok = json!({"token": {"catalog": [
            {"type": "identity", "endpoints": [{"interface": "public", "region_id": "R1", "url": "http://k/v3"}]},
            {"type": "image", "endpoints": [
                {"interface": "internal", "region_id": "R1", "url": "http://internal:9292"},
                {"interface": "public", "region_id": "R2", "url": "http://r2:9292/v2/"},
                {"interface": "public", "region_id": "R1", "url": "http://r1:9292/"}]}]}});
        assert_eq!(
            find_endpoint(&tok, "image", "public", Some("R1")).as_deref(),
            Some("http://r1:9292")
        );
        assert_eq!(
            find_endpoint(&tok, "image", "public", Some("R2")).as_deref(),
            Some("http://r2:9292")
        );
        assert_eq!(
            find_endpoint(&tok, "image", "internal", None).as_deref(),
            Some("http://internal:9292")
        );
        assert_eq!(find_endpoint(&tok, "image", "admin", None), None);
        assert_eq!(find_endpoint(&tok, "compute", "public", None), None);
    }
}
