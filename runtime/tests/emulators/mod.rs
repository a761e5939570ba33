//! Cloud emulators for the driver tests, on free 127.0.0.1 ports:
//!
//! * [`Moto`]: a real `moto_server` (EC2 API);
//! * [`Keystone`]: a real Keystone (sqlite, fernet tokens) under gunicorn;
//! * [`NovaFixtures`]: a small HTTP server answering Nova calls from the recorded fixtures
//!   in `fixtures/nova/` (Nova itself needs placement, neutron and a message queue), and
//!   recording what it was sent.
//!
//! The venvs come from `tests/harness/setup-emulators.sh`, under `$MKIMAGE_EMULATORS`
//! (default `/opt/mkimage-emulators`); the approach is the one of `register/tests/common/`.
//! A missing emulator fails the test with the fix in the message, unless
//! `MKIMAGE_SKIP_EMULATORS=1`, which skips it (see [`emulator`]). Every server runs in its
//! own process group, killed on Drop (also when the test fails).
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub fn emulators_root() -> PathBuf {
    std::env::var_os("MKIMAGE_EMULATORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/mkimage-emulators"))
}

/// A program of an emulator venv. `None` (the test should return) only when it is missing
/// and `MKIMAGE_SKIP_EMULATORS=1`; missing otherwise is a test failure naming the fix.
pub fn emulator(venv: &str, program: &str) -> Option<PathBuf> {
    let p = emulators_root().join(venv).join("bin").join(program);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("MKIMAGE_SKIP_EMULATORS").as_deref() == Ok("1") {
        eprintln!(
            "SKIPPED: {} not found and MKIMAGE_SKIP_EMULATORS=1",
            p.display()
        );
        return None;
    }
    panic!(
        "{} not found: run tests/harness/setup-emulators.sh (as root) to install the cloud \
         emulators, point MKIMAGE_EMULATORS at them, or set MKIMAGE_SKIP_EMULATORS=1 to skip \
         this test",
        p.display()
    );
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

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server process in its own process group; Drop kills the group.
pub struct Server {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Server {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Server {
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `url` until it answers 2xx or 300; panics with the log when the process exits
    /// or the time is up.
    async fn wait_http(&mut self, url: &str, timeout: Duration) {
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
            assert!(
                start.elapsed() < timeout,
                "{} not ready at {url} after {timeout:?}; log:\n{}",
                self.name,
                log_tail(&self.log)
            );
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
        // gunicorn workers may outlive the leader: always finish the group.
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- moto

pub struct Moto {
    pub url: String,
    pub server: Server,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// `None` when skipped (see [`emulator`]).
    pub async fn start() -> Option<Moto> {
        let bin = emulator("venv-moto", "moto_server")?;
        let dir = tempfile::Builder::new().prefix("moto-").tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path());
        let mut server = Server::spawn("moto_server", cmd, dir.path().join("moto.log"));
        let url = format!("http://127.0.0.1:{port}");
        server
            .wait_http(&format!("{url}/moto-api/"), Duration::from_secs(60))
            .await;
        Some(Moto {
            url,
            server,
            _dir: dir,
        })
    }

    /// An EC2 client on this server (region us-east-1, test credentials).
    pub async fn client(&self) -> aws_sdk_ec2::Client {
        use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .load()
            .await;
        aws_sdk_ec2::Client::new(&conf)
    }
}

// ---------------------------------------------------------------- Keystone

pub const ADMIN_PASSWORD: &str = "secret";
pub const REGION: &str = "RegionOne";

pub struct Keystone {
    pub port: u16,
    /// `http://127.0.0.1:PORT/v3`
    pub auth_url: String,
    pub server: Server,
    _dir: tempfile::TempDir,
}

fn user_and_group() -> (String, String) {
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "root".into());
    let group = nix::unistd::Group::from_gid(nix::unistd::getgid())
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| "root".into());
    (user, group)
}

impl Keystone {
    /// Configures (sqlite, fernet), bootstraps (admin/secret, RegionOne) and starts Keystone
    /// under gunicorn. `None` when skipped (see [`emulator`]).
    pub async fn start() -> Option<Keystone> {
        let manage = emulator("venv-keystone", "keystone-manage")?;
        let gunicorn = emulator("venv-keystone", "gunicorn")?;
        let dir = tempfile::Builder::new()
            .prefix("keystone-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}/v3/");
        let conf = d.join("keystone.conf");
        fs::write(
            &conf,
            format!(
                "[DEFAULT]\n[database]\nconnection = sqlite:///{db}\n\
                 [token]\nprovider = fernet\n[fernet_tokens]\nkey_repository = {fk}\n\
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
        Some(Keystone {
            port,
            auth_url: format!("http://127.0.0.1:{port}/v3"),
            server,
            _dir: dir,
        })
    }

    pub async fn admin_token(&self) -> String {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": "admin", "domain": {"id": "default"}, "password": ADMIN_PASSWORD}}},
            "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}});
        let r = reqwest::Client::new()
            .post(format!("{}/auth/tokens", self.auth_url))
            .json(&body)
            .send()
            .await
            .expect("POST /v3/auth/tokens");
        assert_eq!(r.status().as_u16(), 201, "Keystone admin token");
        r.headers()["x-subject-token"].to_str().unwrap().to_string()
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

    /// A project, and a user with the `member` role on it, in the default domain.
    pub async fn add_project_user(&self, project: &str, user: &str, password: &str) {
        use reqwest::Method;
        let p = self
            .api(
                Method::POST,
                "/projects",
                Some(json!({"project": {"name": project, "domain_id": "default"}})),
            )
            .await;
        let pid = p["project"]["id"].as_str().unwrap().to_string();
        let u = self
            .api(
                Method::POST,
                "/users",
                Some(json!({"user": {"name": user, "password": password,
                    "domain_id": "default", "default_project_id": pid}})),
            )
            .await;
        let uid = u["user"]["id"].as_str().unwrap().to_string();
        let roles = self.api(Method::GET, "/roles?name=member", None).await;
        let rid = roles["roles"][0]["id"].as_str().unwrap().to_string();
        self.api(
            Method::PUT,
            &format!("/projects/{pid}/users/{uid}/roles/{rid}"),
            None,
        )
        .await;
    }

    /// Registers a `compute` service with a public endpoint at `url`.
    pub async fn add_compute_endpoint(&self, url: &str) {
        use reqwest::Method;
        let svc = self
            .api(
                Method::POST,
                "/services",
                Some(json!({"service": {"type": "compute", "name": "nova"}})),
            )
            .await;
        let sid = svc["service"]["id"].as_str().unwrap().to_string();
        self.api(
            Method::POST,
            "/endpoints",
            Some(
                json!({"endpoint": {"service_id": sid, "interface": "public",
                "url": url, "region_id": REGION}}),
            ),
        )
        .await;
    }

    /// Does Keystone accept `token` (GET /v3/auth/tokens)?
    pub async fn token_valid(&self, token: &str) -> bool {
        let admin = self.admin_token().await;
        let r = reqwest::Client::new()
            .get(format!("{}/auth/tokens", self.auth_url))
            .header("X-Auth-Token", admin)
            .header("X-Subject-Token", token)
            .send()
            .await
            .expect("GET /v3/auth/tokens");
        r.status().is_success()
    }
}

// ---------------------------------------------------------------- Nova fixtures

/// One recorded exchange of `fixtures/nova/*.json`.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub file: String,
    pub method: String,
    /// Path below the compute endpoint; `{name}` segments match any segment.
    pub path: String,
    pub status: u16,
    pub body: Value,
}

/// A request the fixture server got.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub token: Option<String>,
    pub body: Value,
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/nova")
}

pub fn load_fixtures() -> Vec<Fixture> {
    let mut files: Vec<PathBuf> = fs::read_dir(fixtures_dir())
        .expect("fixtures/nova")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let v: Value = serde_json::from_str(&fs::read_to_string(p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            Fixture {
                file: p.file_name().unwrap().to_string_lossy().into_owned(),
                method: v["request"]["method"].as_str().unwrap().to_string(),
                path: v["request"]["path"].as_str().unwrap().to_string(),
                status: v["response"]["status"].as_u64().unwrap() as u16,
                body: v["response"]["body"].clone(),
            }
        })
        .collect()
}

fn path_matches(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let q: Vec<&str> = path.trim_matches('/').split('/').collect();
    p.len() == q.len()
        && p.iter()
            .zip(&q)
            .all(|(a, b)| (a.starts_with('{') && a.ends_with('}')) || a == b)
}

struct NovaState {
    fixtures: Vec<Fixture>,
    seen: Vec<Seen>,
}

/// Serves the Nova fixtures under `/v2.1` on 127.0.0.1. Fixtures with the same method and
/// path are answered in file-name order, the last one from then on (a server that is
/// `BUILD` first and then `ACTIVE`). Requests without `X-Auth-Token` get 401.
pub struct NovaFixtures {
    /// The compute endpoint: `http://127.0.0.1:PORT/v2.1`.
    pub url: String,
    state: Arc<Mutex<NovaState>>,
    task: tokio::task::JoinHandle<()>,
}

impl NovaFixtures {
    pub async fn start() -> NovaFixtures {
        let state = Arc::new(Mutex::new(NovaState {
            fixtures: load_fixtures(),
            seen: Vec::new(),
        }));
        let st = state.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let st = st.clone();
            async move { answer(st, req).await }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v2.1", l.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        NovaFixtures { url, state, task }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

impl Drop for NovaFixtures {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    st: Arc<Mutex<NovaState>>,
    req: axum::extract::Request,
) -> axum::response::Response<axum::body::Body> {
    use axum::response::IntoResponse;
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let token = req
        .headers()
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut s = st.lock().unwrap();
    let Some(rel) = path.strip_prefix("/v2.1") else {
        return (axum::http::StatusCode::NOT_FOUND, "not under /v2.1").into_response();
    };
    let rel = rel.to_string();
    let n_before = s
        .seen
        .iter()
        .filter(|x| x.method == method && x.path == path)
        .count();
    s.seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        query,
        token: token.clone(),
        body,
    });
    if token.is_none() {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": {"code": 401, "message": "no X-Auth-Token"}})),
        )
            .into_response();
    }
    let mut matching: Vec<&Fixture> = s
        .fixtures
        .iter()
        .filter(|f| f.method == method && path_matches(&f.path, &rel))
        .collect();
    // A literal path (`/servers/detail`) wins over a pattern (`/servers/{server_id}`).
    if matching.iter().any(|f| f.path == rel) {
        matching.retain(|f| f.path == rel);
    }
    let Some(f) = matching.get(n_before.min(matching.len().saturating_sub(1))) else {
        return (
            axum::http::StatusCode::NOT_FOUND,
            axum::Json(json!({"itemNotFound": {"code": 404,
                "message": format!("no fixture for {method} {rel}")}})),
        )
            .into_response();
    };
    let status = axum::http::StatusCode::from_u16(f.status).unwrap();
    if f.body.is_null() {
        status.into_response()
    } else {
        (status, axum::Json(f.body.clone())).into_response()
    }
}
