//! Test aid: a manager of any service type, in process, with the `local` cloud (agents are
//! real `cps agent` processes on 127.0.0.1 that enrol with their tokens), a throw-away CA and
//! a user certificate to call it with. Used by the runtime's service tests, including the
//! ones `mkimage service new` generates.
//!
//! ```ignore
//! let m = TestManager::start("helloworld", env!("CARGO_BIN_EXE_cps"), "STARTING_NODES = 1").await?;
//! m.post("startup", json!({})).await?;
//! m.wait_state(State::RUNNING).await?;
//! ```
//! Dropping it kills the agents and removes its directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::client::{ClientError, RpcClient};
use crate::config::Ini;
use crate::manager::{ManagerConfig, Running, State};
use crate::pki::{self, Ca, CertPaths, Identity, PeerRule, Role, Validity};

pub struct TestManager {
    pub running: Running,
    pub dir: PathBuf,
    pub client: RpcClient,
    pub status_port: Option<u16>,
}

impl TestManager {
    /// Starts a manager of `service_type`; `extra` is appended to its `[manager]` section
    /// (e.g. `STARTING_NODES = 0`, `STATUS_PORT = 0`). `cps_bin` runs the agents.
    pub async fn start(service_type: &str, cps_bin: impl AsRef<Path>, extra: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("cps-test-{}", pki::random_hex(6)));
        std::fs::create_dir_all(&dir)?;
        // Traversable by the unprivileged users scripts may run as.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let ca = Ca::generate("test CA", 2)?;
        ca.save(&dir.join("ca"))?;
        let issue = |name: &str, role: Role| -> Result<CertPaths> {
            let (cert, key) = ca.issue(
                &Identity {
                    role,
                    uid: 1,
                    app: 2,
                },
                name,
                Validity::days(1),
            )?;
            let p = CertPaths::in_dir(&dir.join(name));
            std::fs::create_dir_all(dir.join(name))?;
            pki::write_file(&p.cert, &cert, 0o644)?;
            pki::write_file(&p.key, &key, 0o600)?;
            pki::write_file(&p.ca, &ca.cert_pem, 0o644)?;
            Ok(p)
        };
        issue("mgr", Role::Manager)?;
        let user = issue("user", Role::User)?;
        let d = |s: &str| dir.join(s).display().to_string();
        let text = format!(
            "[manager]\nTYPE = {service_type}\nUSER_ID = 1\nAPP_ID = 2\nBIND = 127.0.0.1\nMY_IP = 127.0.0.1\n\
             PORT = 0\nENROLL_PORT = 0\nLOG_FILE = {}\nCERT_DIR = {}\nCA_DIR = {}\nVAR_RUN = {}\n\
             VAR_CACHE = {}\nCONFIG_DIR = {}\nCLOUD = local\nCPS_BIN = {}\nPOLL_INTERVAL = 0.2\n\
             BOOT_TIMEOUT = 30\nMAX_RETRIES = 2\n{extra}\n",
            d("manager.log"),
            d("mgr"),
            d("ca"),
            d("run"),
            d("cache"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../config").display(),
            cps_bin.as_ref().display(),
        );
        std::fs::write(dir.join("manager.cfg"), &text)?;
        let mut ini = Ini::parse(&text)?;
        // Service annexes of the manager (config/manager/<type>-manager.cfg) come first,
        // the test's settings win.
        let annex = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config/manager")
            .join(format!("{service_type}-manager.cfg"));
        if let Ok(a) = std::fs::read_to_string(&annex) {
            let a = Ini::parse(&format!("[manager]\n{a}"))
                .with_context(|| format!("parsing {}", annex.display()))?;
            for k in a.keys("manager") {
                if ini.get("manager", &k).is_none() {
                    ini.set("manager", &k, &a.get("manager", &k).unwrap_or_default());
                }
            }
        }
        crate::init_logging(Some(&dir.join("manager.log")))?;
        let cfg = ManagerConfig::from_ini(&ini)?;
        let running = crate::manager::start(&cfg).await?;
        let ports: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("run/ports.json"))?)?;
        let status_port = ports["status_port"].as_u64().map(|p| p as u16);
        let mut client = RpcClient::new(
            pki::client_config(
                &user,
                PeerRule {
                    roles: vec![Role::Manager],
                    uid: 1,
                    app: Some(2),
                },
            )?,
            running.rpc_addr.to_string(),
        );
        client.timeout = Duration::from_secs(60);
        Ok(TestManager {
            running,
            dir,
            client,
            status_port,
        })
    }

    pub async fn get(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.client.get(0, method, &params).await
    }

    pub async fn post(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.client.post(0, method, &params).await
    }

    pub fn state(&self) -> State {
        self.running.manager.state()
    }

    /// Waits (up to 60 s) for `s`; fails at once on ERROR, with the manager log.
    pub async fn wait_state(&self, s: State) -> Result<()> {
        let start = Instant::now();
        loop {
            let st = self.state();
            if st == s {
                return Ok(());
            }
            if st == State::ERROR && s != State::ERROR {
                bail!("manager went to ERROR; log:\n{}", self.log());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "timed out waiting for {s} (state {st}); log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("manager.log")).unwrap_or_default()
    }

    /// The directory of local node `vmid` (1, 2, …).
    pub fn node_dir(&self, vmid: u32) -> PathBuf {
        self.dir.join("cache/local-nodes").join(vmid.to_string())
    }
}

impl Drop for TestManager {
    fn drop(&mut self) {
        for c in &self.running.local_clouds {
            c.kill_all();
        }
        if std::env::var_os("CPS_KEEP_TEST_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
