//! Shared test helpers: a throw-away PKI, in-process servers, process guards.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime::client::RpcClient;
use runtime::pki::{self, Ca, CertPaths, Identity, PeerRule, Role, Validity};
use runtime::rpc::Dispatcher;

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test CA", 30).unwrap();
        ca.save(&dir.path().join("ca")).unwrap();
        Pki { dir, ca }
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Issues a cert for `(role, uid, app)` into a fresh directory.
    pub fn issue(&self, name: &str, role: Role, uid: u64, app: u64) -> CertPaths {
        self.issue_with(name, &self.ca, role, uid, app, Validity::days(1))
    }

    pub fn issue_with(
        &self,
        name: &str,
        ca: &Ca,
        role: Role,
        uid: u64,
        app: u64,
        v: Validity,
    ) -> CertPaths {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (cert, key) = ca.issue(&Identity { role, uid, app }, name, v).unwrap();
        let p = CertPaths::in_dir(&d);
        std::fs::write(&p.cert, cert).unwrap();
        std::fs::write(&p.key, key).unwrap();
        std::fs::write(&p.ca, &self.ca.cert_pem).unwrap();
        p
    }
}

/// Serves `d` over mTLS on 127.0.0.1 (ephemeral port). The task ends with the test runtime.
pub async fn serve(d: Dispatcher, server: &CertPaths, rule: PeerRule) -> SocketAddr {
    let tls = pki::server_config(server, rule).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(runtime::rpc::serve_tls(l, tls, d.router()));
    addr
}

pub fn client(paths: &CertPaths, server_rule: PeerRule, addr: SocketAddr) -> RpcClient {
    let mut c = RpcClient::new(
        pki::client_config(paths, server_rule).unwrap(),
        addr.to_string(),
    );
    c.timeout = Duration::from_secs(20);
    c
}

/// Kills (and reaps) a child process when dropped, also when the test fails.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }
    /// Sends SIGTERM and waits up to `t` for the process to exit.
    pub fn terminate(&mut self, t: Duration) -> bool {
        if let Some(c) = self.0.as_mut() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let start = Instant::now();
            while start.elapsed() < t {
                if let Ok(Some(_)) = c.try_wait() {
                    self.0 = None;
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        false
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub async fn wait_for_async<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn process_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie counts as dead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(s.split_whitespace().nth(2), Some("Z")),
        Err(_) => false,
    }
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}

pub fn write(path: &Path, s: &str) {
    std::fs::write(path, s).unwrap();
}
