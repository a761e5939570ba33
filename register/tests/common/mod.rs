//! Test harness: real cloud emulators started on free 127.0.0.1 ports.
//!
//! * [`MotoServer`]: `moto_server` (EC2, EBS direct, S3) with moto's request recorder on.
//! * [`Keystone`]: a real Keystone (sqlite, fernet tokens) under gunicorn.
//! * [`Glance`]: a real Glance (sqlite, file store, `flavor = keystone`) under gunicorn.
//!
//! The venvs come from `tests/harness/setup-emulators.sh`, under
//! `$MKIMAGE_EMULATORS` (default `/opt/mkimage-emulators`). Every server runs in its
//! own process group, which Drop kills, also when the test fails.
#![allow(dead_code)]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn emulators_root() -> PathBuf {
    std::env::var_os("MKIMAGE_EMULATORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/mkimage-emulators"))
}

/// A program from one of the emulator venvs; panics with the fix when missing.
pub fn venv_bin(venv: &str, program: &str) -> PathBuf {
    let p = emulators_root().join(venv).join("bin").join(program);
    if !p.exists() {
        panic!(
            "{} not found: run tests/harness/setup-emulators.sh (as root) to install the \
             cloud emulators, or point MKIMAGE_EMULATORS at where they are",
            p.display()
        );
    }
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn log_tail(path: &Path) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Runs a set-up command to completion; panics with its output on failure.
pub fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A server process in its own process group, killed on Drop.
pub struct Server {
    pub name: &'static str,
    child: Child,
    pub log: PathBuf,
}

impl Server {
    pub fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Server {
        use std::os::unix::process::CommandExt;
        let out = fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Server { name, child, log }
    }

    /// Polls `url` until it answers `ok_status`; panics with the log when the
    /// process exits or the time is up.
    pub async fn wait_http(&mut self, url: &str, timeout: Duration) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited ({st}) before it was ready; log {}:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log)
                );
            }
            if let Ok(r) = http.get(url).send().await {
                if r.status().is_success() || r.status().as_u16() == 300 {
                    return;
                }
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} not ready at {url} after {timeout:?}; log:\n{}",
                    self.name,
                    log_tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let pgid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pgid, Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Workers of the group may outlive the leader: always finish the group.
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- moto

/// One request moto's recorder saw.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub url: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn path(&self) -> &str {
        let after_scheme = self.url.split("://").nth(1).unwrap_or(&self.url);
        let p = after_scheme
            .find('/')
            .map(|i| &after_scheme[i..])
            .unwrap_or("/");
        p.split('?').next().unwrap_or(p)
    }

    /// Header by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The form parameters of an AWS query-protocol request (EC2).
    pub fn form(&self) -> BTreeMap<String, String> {
        let s = String::from_utf8_lossy(&self.body);
        s.split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (url_decode(k), url_decode(v))
            })
            .collect()
    }

    /// EC2 query action, if any.
    pub fn action(&self) -> Option<String> {
        self.form().get("Action").cloned()
    }
}

pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub struct MotoServer {
    pub url: String,
    pub port: u16,
    recording: PathBuf,
    _server: Server,
    _dir: tempfile::TempDir,
}

impl MotoServer {
    /// Starts `moto_server` on a free port with the request recorder on.
    pub async fn start() -> MotoServer {
        let bin = venv_bin("venv-moto", "moto_server");
        let dir = tempfile::Builder::new()
            .prefix("moto-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let recording = dir.path().join("recording.jsonl");
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .env("MOTO_ENABLE_RECORDING", "true")
            .env("MOTO_RECORDER_FILEPATH", &recording);
        let mut server = Server::spawn("moto_server", cmd, dir.path().join("moto.log"));
        let url = format!("http://127.0.0.1:{port}");
        server
            .wait_http(&format!("{url}/moto-api/"), Duration::from_secs(60))
            .await;
        MotoServer {
            url,
            port,
            recording,
            _server: server,
            _dir: dir,
        }
    }

    /// Every request recorded so far (moto's `/moto-api/recorder/download-recording`).
    pub async fn recorded(&self) -> Vec<Recorded> {
        let text = reqwest::get(format!("{}/moto-api/recorder/download-recording", self.url))
            .await
            .expect("download-recording")
            .text()
            .await
            .expect("recording text");
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("recording line is JSON");
                let body = match (v.get("body"), v.get("body_encoded")) {
                    (Some(Value::String(b)), Some(Value::Bool(true))) => {
                        B64.decode(b).expect("base64 body")
                    }
                    (Some(Value::String(b)), _) => b.clone().into_bytes(),
                    _ => vec![],
                };
                Recorded {
                    method: v["method"].as_str().unwrap_or("").to_string(),
                    url: v["url"].as_str().unwrap_or("").to_string(),
                    headers: v["headers"]
                        .as_object()
                        .map(|h| {
                            h.iter()
                                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                                .collect()
                        })
                        .unwrap_or_default(),
                    body,
                }
            })
            .collect()
    }

    /// Empties the recording.
    pub async fn reset_recording(&self) {
        let r = reqwest::Client::new()
            .post(format!("{}/moto-api/recorder/reset-recording", self.url))
            .send()
            .await
            .expect("reset-recording");
        assert!(r.status().is_success(), "reset-recording: {}", r.status());
    }

    pub fn recording_path(&self) -> &Path {
        &self.recording
    }

    /// Options that point the library at this server.
    pub fn ec2_options(&self) -> register::Ec2Options {
        register::Ec2Options {
            endpoint_url: Some(self.url.clone()),
            region: Some("us-east-1".into()),
            credentials: Some(register::StaticCredentials {
                access_key_id: "testing".into(),
                secret_access_key: "testing".into(),
                session_token: None,
            }),
            poll_interval: Duration::from_millis(100),
            wait_timeout: Duration::from_secs(60),
            max_attempts: Some(1),
            ..register::Ec2Options::default()
        }
    }
}

// ---------------------------------------------------------------- Keystone

pub const ADMIN_PASSWORD: &str = "secret";
pub const REGION: &str = "RegionOne";

pub struct Keystone {
    pub port: u16,
    /// `http://127.0.0.1:PORT/v3`
    pub auth_url: String,
    _server: Server,
    dir: tempfile::TempDir,
}

fn user_and_group() -> (String, String) {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "root".into());
    let group = nix::unistd::Group::from_gid(gid)
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| "root".into());
    (user, group)
}

impl Keystone {
    /// Configures (sqlite, fernet), bootstraps (admin/secret, RegionOne, public,
    /// internal and admin identity endpoints) and starts Keystone under gunicorn.
    pub async fn start() -> Keystone {
        let manage = venv_bin("venv-keystone", "keystone-manage");
        let gunicorn = venv_bin("venv-keystone", "gunicorn");
        let dir = tempfile::Builder::new()
            .prefix("keystone-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}/v3/");
        let conf = d.join("keystone.conf");
        fs::write(
            &conf,
            format!(
                "[DEFAULT]\n\
                 [database]\nconnection = sqlite:///{db}\n\
                 [token]\nprovider = fernet\n\
                 [fernet_tokens]\nkey_repository = {fk}\n\
                 [credential]\nkey_repository = {ck}\n",
                db = d.join("keystone.sqlite").display(),
                fk = d.join("fernet-keys").display(),
                ck = d.join("credential-keys").display(),
            ),
        )
        .unwrap();
        let (user, group) = user_and_group();
        let c = conf.to_str().unwrap();
        run(
            Command::new(&manage).args(["--config-file", c, "db_sync"]),
            "keystone-manage db_sync",
        );
        for step in ["fernet_setup", "credential_setup"] {
            run(
                Command::new(&manage).args([
                    "--config-file",
                    c,
                    step,
                    "--keystone-user",
                    &user,
                    "--keystone-group",
                    &group,
                ]),
                step,
            );
        }
        run(
            Command::new(&manage).args([
                "--config-file",
                c,
                "bootstrap",
                "--bootstrap-password",
                ADMIN_PASSWORD,
                "--bootstrap-admin-url",
                &url,
                "--bootstrap-public-url",
                &url,
                "--bootstrap-internal-url",
                &url,
                "--bootstrap-region-id",
                REGION,
            ]),
            "keystone-manage bootstrap",
        );
        // Without this wrapper oslo.config parses gunicorn's argv and the worker exits.
        fs::write(
            d.join("ks_app.py"),
            "import sys\nsys.argv = sys.argv[:1]\nfrom keystone.wsgi.api import application  # noqa: F401\n",
        )
        .unwrap();
        let mut cmd = Command::new(gunicorn);
        cmd.args([
            "--chdir",
            d.to_str().unwrap(),
            "-b",
            &format!("127.0.0.1:{port}"),
            "-w",
            "1",
            "--timeout",
            "120",
            "ks_app:application",
        ])
        .env("OS_KEYSTONE_CONFIG_FILES", &conf);
        let mut server = Server::spawn("keystone (gunicorn)", cmd, d.join("keystone.log"));
        server
            .wait_http(
                &format!("http://127.0.0.1:{port}/v3"),
                Duration::from_secs(90),
            )
            .await;
        Keystone {
            port,
            auth_url: format!("http://127.0.0.1:{port}/v3"),
            _server: server,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// (token, token body) for user/password scoped to the project.
    pub async fn token_for(&self, user: &str, password: &str, project: &str) -> (String, Value) {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": user, "domain": {"id": "default"}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"id": "default"}}}}});
        let r = reqwest::Client::new()
            .post(format!("{}/auth/tokens", self.auth_url))
            .json(&body)
            .send()
            .await
            .expect("POST /v3/auth/tokens");
        assert_eq!(r.status().as_u16(), 201, "Keystone token for {user}");
        let tok = r.headers()["x-subject-token"].to_str().unwrap().to_string();
        (tok, r.json().await.unwrap())
    }

    pub async fn admin_token(&self) -> String {
        self.token_for("admin", ADMIN_PASSWORD, "admin").await.0
    }

    /// An admin API call; panics unless it succeeds.
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let tok = self.admin_token().await;
        let mut req = reqwest::Client::new()
            .request(method.clone(), format!("{}{path}", self.auth_url))
            .header("X-Auth-Token", tok);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("Keystone API call");
        let st = r.status();
        let text = r.text().await.unwrap_or_default();
        assert!(st.is_success(), "{method} {path}: {st}: {text}");
        if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    /// A clouds.yaml with cloud `test` (admin/secret) in `dir`.
    pub fn write_clouds_yaml(&self, dir: &Path) -> PathBuf {
        let p = dir.join("clouds.yaml");
        fs::write(
            &p,
            format!(
                "clouds:\n  test:\n    auth:\n      auth_url: {}\n      username: admin\n      password: {ADMIN_PASSWORD}\n      project_name: admin\n      user_domain_name: Default\n      project_domain_name: Default\n    region_name: {REGION}\n    interface: public\n    identity_api_version: 3\n",
                self.auth_url
            ),
        )
        .unwrap();
        p
    }
}

// ---------------------------------------------------------------- Glance

pub struct Glance {
    pub port: u16,
    pub url: String,
    _server: Server,
    dir: tempfile::TempDir,
}

impl Glance {
    /// Registers the glance service user and the image endpoints in `ks`, then
    /// configures (sqlite, file store, `flavor = keystone`) and starts Glance.
    pub async fn start(ks: &Keystone) -> Glance {
        let manage = venv_bin("venv-glance", "glance-manage");
        let gunicorn = venv_bin("venv-glance", "gunicorn");
        let paste = emulators_root().join("venv-glance/etc/glance/glance-api-paste.ini");
        assert!(
            paste.exists(),
            "{} missing: run tests/harness/setup-emulators.sh",
            paste.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("glance-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");

        // Service project, glance user with admin role, image service + endpoints.
        use reqwest::Method;
        let project = ks
            .api(
                Method::POST,
                "/projects",
                Some(json!({"project": {"name": "service", "domain_id": "default"}})),
            )
            .await;
        let project_id = project["project"]["id"].as_str().unwrap().to_string();
        let user = ks
            .api(
                Method::POST,
                "/users",
                Some(json!({"user": {"name": "glance", "password": "glance",
                    "domain_id": "default", "default_project_id": project_id}})),
            )
            .await;
        let user_id = user["user"]["id"].as_str().unwrap().to_string();
        let roles = ks.api(Method::GET, "/roles?name=admin", None).await;
        let role_id = roles["roles"][0]["id"].as_str().unwrap().to_string();
        ks.api(
            Method::PUT,
            &format!("/projects/{project_id}/users/{user_id}/roles/{role_id}"),
            None,
        )
        .await;
        let svc = ks
            .api(
                Method::POST,
                "/services",
                Some(json!({"service": {"type": "image", "name": "glance"}})),
            )
            .await;
        let svc_id = svc["service"]["id"].as_str().unwrap().to_string();
        for interface in ["public", "internal", "admin"] {
            ks.api(
                Method::POST,
                "/endpoints",
                Some(
                    json!({"endpoint": {"service_id": svc_id, "interface": interface,
                    "url": url, "region_id": REGION}}),
                ),
            )
            .await;
        }

        let etc = d.join("etc");
        fs::create_dir_all(&etc).unwrap();
        fs::copy(&paste, etc.join("glance-api-paste.ini")).unwrap();
        let ks_root = format!("http://127.0.0.1:{}", ks.port);
        let conf = etc.join("glance-api.conf");
        fs::write(
            &conf,
            format!(
                "[DEFAULT]\n\
                 bind_host = 127.0.0.1\nbind_port = {port}\nworkers = 0\n\
                 enabled_backends = fs:file\n\
                 image_cache_dir = {d}/cache\n\
                 [database]\nconnection = sqlite:///{d}/glance.sqlite\n\
                 [paste_deploy]\nflavor = keystone\nconfig_file = {etc}/glance-api-paste.ini\n\
                 [glance_store]\ndefault_backend = fs\n\
                 [fs]\nfilesystem_store_datadir = {d}/images\n\
                 [os_glance_staging_store]\nfilesystem_store_datadir = {d}/staging\n\
                 [os_glance_tasks_store]\nfilesystem_store_datadir = {d}/tasks\n\
                 [oslo_policy]\nenforce_new_defaults = false\nenforce_scope = false\n\
                 [keystone_authtoken]\n\
                 www_authenticate_uri = {ks_root}\nauth_url = {ks_root}\nauth_type = password\n\
                 project_domain_name = Default\nuser_domain_name = Default\n\
                 project_name = service\nusername = glance\npassword = glance\n\
                 region_name = {REGION}\n",
                d = d.display(),
                etc = etc.display(),
            ),
        )
        .unwrap();
        run(
            Command::new(&manage).args(["--config-file", conf.to_str().unwrap(), "db_sync"]),
            "glance-manage db_sync",
        );
        let mut cmd = Command::new(gunicorn);
        cmd.args([
            "-b",
            &format!("127.0.0.1:{port}"),
            "-w",
            "1",
            "--timeout",
            "300",
            "glance.wsgi.api:application",
        ])
        .current_dir(d)
        .env("OS_GLANCE_CONFIG_DIR", &etc);
        let mut server = Server::spawn("glance (gunicorn)", cmd, d.join("glance.log"));
        server
            .wait_http(&format!("{url}/versions"), Duration::from_secs(90))
            .await;
        Glance {
            port,
            url,
            _server: server,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

// ---------------------------------------------------------------- images

/// Deterministic non-zero bytes (xorshift).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// A sparse test image: `size` bytes, with data written at `(offset, len)` regions.
pub fn make_image(path: &Path, size: u64, regions: &[(u64, usize)]) -> Vec<u8> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, (off, len)) in regions.iter().enumerate() {
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.write_all(&pattern(*len, 0x9e37_79b9 + i as u64)).unwrap();
    }
    drop(f);
    fs::read(path).unwrap()
}

/// (index, data) of the non-zero `block`-sized blocks (last one zero-padded).
pub fn nonzero_blocks(data: &[u8], block: usize) -> Vec<(usize, Vec<u8>)> {
    data.chunks(block)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, c)| {
            let mut v = c.to_vec();
            v.resize(block, 0);
            (i, v)
        })
        .collect()
}

pub fn image_info(path: &Path, name: &str, build_id: &str) -> register::ImageInfo {
    register::ImageInfo {
        path: path.to_path_buf(),
        name: name.into(),
        description: Some(format!("test image {name}")),
        arch: "x86_64".into(),
        disk_format: "raw".into(),
        md5: None,
        sha256: None,
        build_id: build_id.into(),
    }
}

/// A [`register::Progress`] that adds up what it is told.
#[derive(Default)]
pub struct CountingProgress {
    pub started: std::sync::Mutex<Vec<(String, u64)>>,
    pub advanced: std::sync::atomic::AtomicU64,
    pub finished: std::sync::atomic::AtomicU64,
}

impl register::Progress for CountingProgress {
    fn start(&self, what: &str, total_bytes: u64) {
        self.started
            .lock()
            .unwrap()
            .push((what.to_string(), total_bytes));
    }
    fn advance(&self, bytes: u64) {
        self.advanced
            .fetch_add(bytes, std::sync::atomic::Ordering::SeqCst);
    }
    fn finish(&self) {
        self.finished
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}
