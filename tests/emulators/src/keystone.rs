//! A real Keystone: sqlite database, fernet tokens, bootstrapped with an admin user and
//! the identity endpoints, served by gunicorn.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::{emulator, free_port, run, work_dir, Server};

/// The password of the bootstrap user `admin` (project `admin`, domain `default`).
pub const ADMIN_PASSWORD: &str = "secret";
/// The region of every endpoint the harness registers.
pub const REGION: &str = "RegionOne";

/// A running Keystone on 127.0.0.1.
pub struct Keystone {
    /// The port it listens on.
    pub port: u16,
    /// `http://127.0.0.1:PORT/v3`
    pub auth_url: String,
    _server: Server,
    dir: tempfile::TempDir,
}

impl Keystone {
    /// Configures (sqlite, fernet), bootstraps (admin/[`ADMIN_PASSWORD`], [`REGION`],
    /// public, internal and admin identity endpoints) and starts Keystone under gunicorn,
    /// then waits until it answers. `None` when skipped (see [`emulator`]).
    pub async fn start() -> Option<Keystone> {
        let manage = emulator("venv-keystone", "keystone-manage")?;
        let gunicorn = emulator("venv-keystone", "gunicorn")?;
        let dir = work_dir("keystone");
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
        .expect("write keystone.conf");
        let (user, group) = user_and_group();
        let c = conf.to_str().expect("UTF-8 temp path");
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
        .expect("write ks_app.py");
        let mut cmd = Command::new(gunicorn);
        cmd.args([
            "--chdir",
            d.to_str().expect("UTF-8 temp path"),
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
        let auth_url = format!("http://127.0.0.1:{port}/v3");
        server.wait_http(&auth_url, Duration::from_secs(90)).await;
        Some(Keystone {
            port,
            auth_url,
            _server: server,
            dir,
        })
    }

    /// The temp dir with the configuration, database, keys and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// (token, token body) for `user`/`password` of the default domain, scoped to
    /// `project`; panics unless Keystone issues it.
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
        let tok = r.headers()["x-subject-token"]
            .to_str()
            .expect("X-Subject-Token")
            .to_string();
        (tok, r.json().await.expect("token body"))
    }

    /// A token of `admin` scoped to project `admin`.
    pub async fn admin_token(&self) -> String {
        self.token_for("admin", ADMIN_PASSWORD, "admin").await.0
    }

    /// An admin call to `{auth_url}{path}`; panics unless it succeeds. The JSON answer, or
    /// `Null` when empty.
    pub async fn api(&self, method: Method, path: &str, body: Option<Value>) -> Value {
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
            serde_json::from_str(&text).expect("Keystone answer is JSON")
        }
    }

    /// A project and a user (default project: that one) in the default domain, the user
    /// given `role` (e.g. `member`, `admin`) on the project.
    pub async fn add_project_user(&self, project: &str, user: &str, password: &str, role: &str) {
        let p = self
            .api(
                Method::POST,
                "/projects",
                Some(json!({"project": {"name": project, "domain_id": "default"}})),
            )
            .await;
        let pid = id_of(&p["project"]);
        let u = self
            .api(
                Method::POST,
                "/users",
                Some(json!({"user": {"name": user, "password": password,
                    "domain_id": "default", "default_project_id": pid}})),
            )
            .await;
        let uid = id_of(&u["user"]);
        let roles = self
            .api(Method::GET, &format!("/roles?name={role}"), None)
            .await;
        let rid = id_of(&roles["roles"][0]);
        self.api(
            Method::PUT,
            &format!("/projects/{pid}/users/{uid}/roles/{rid}"),
            None,
        )
        .await;
    }

    /// A service of type `kind` named `name`, with an endpoint at `url` in [`REGION`] for
    /// each of `interfaces` (`public`, `internal`, `admin`).
    pub async fn add_service(&self, kind: &str, name: &str, url: &str, interfaces: &[&str]) {
        let svc = self
            .api(
                Method::POST,
                "/services",
                Some(json!({"service": {"type": kind, "name": name}})),
            )
            .await;
        let sid = id_of(&svc["service"]);
        for interface in interfaces {
            self.api(
                Method::POST,
                "/endpoints",
                Some(
                    json!({"endpoint": {"service_id": sid, "interface": interface,
                    "url": url, "region_id": REGION}}),
                ),
            )
            .await;
        }
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

    /// Writes `dir/clouds.yaml` with cloud `test` (admin/[`ADMIN_PASSWORD`], project
    /// `admin`, [`REGION`], public interface) and returns its path.
    pub fn write_clouds_yaml(&self, dir: &Path) -> PathBuf {
        let p = dir.join("clouds.yaml");
        fs::write(
            &p,
            format!(
                "clouds:\n  test:\n    auth:\n      auth_url: {}\n      username: admin\n      password: {ADMIN_PASSWORD}\n      project_name: admin\n      user_domain_name: Default\n      project_domain_name: Default\n    region_name: {REGION}\n    interface: public\n    identity_api_version: 3\n",
                self.auth_url
            ),
        )
        .expect("write clouds.yaml");
        p
    }
}

/// The `id` of a Keystone object (`{"project": {"id": …}}["project"]`).
fn id_of(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {v}"))
        .to_string()
}

/// The user and group names of this process, for keystone-manage's key setup.
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
