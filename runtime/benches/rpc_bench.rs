//! Benchmark (run by hand: `cargo bench -p runtime`), not a test.
//!
//! Prints:
//! * the RSS of an idle `cps agent` process (target <= 10 MB);
//! * throughput and latency percentiles of 1000 concurrent `get_service_info` calls to a
//!   `cps manager` process over mTLS on loopback (target p99 < 50 ms), measured twice:
//!   on 1000 established keep-alive connections ("warm"), and with a fresh TLS connection
//!   per call ("cold", handshake included, as the original client did).
//!   The load generator is single-threaded; the manager has two worker threads.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runtime::client::RpcClient;
use runtime::pki::{self, Ca, CertPaths, Identity, PeerRule, Role, Validity};
use serde_json::json;

const CPS: &str = env!("CARGO_BIN_EXE_cps");
const N: usize = 1000;

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn issue(ca: &Ca, dir: &Path, role: Role) -> CertPaths {
    std::fs::create_dir_all(dir).unwrap();
    let (c, k) = ca
        .issue(
            &Identity {
                role,
                uid: 1,
                app: 1,
            },
            "bench",
            Validity::days(1),
        )
        .unwrap();
    let p = CertPaths::in_dir(dir);
    std::fs::write(&p.cert, c).unwrap();
    std::fs::write(&p.key, k).unwrap();
    std::fs::write(&p.ca, &ca.cert_pem).unwrap();
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

async fn wait_up(c: &RpcClient, method: &str) {
    let start = Instant::now();
    while c.get(0, method, &json!({})).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after the command: state is field 3, utime 14, stime 15 (1-based over the whole line)
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(name: &str, mut lat: Vec<Duration>, wall: Duration) {
    lat.sort();
    println!(
        "{name:<34} {:>6} calls in {:>7.1} ms = {:>7.0} calls/s   p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms",
        lat.len(),
        wall.as_secs_f64() * 1000.0,
        lat.len() as f64 / wall.as_secs_f64(),
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::generate("bench CA", 1).unwrap();
    ca.save(&d.join("ca")).unwrap();
    issue(&ca, &d.join("agent/certs"), Role::Agent);
    let mgr_certs = issue(&ca, &d.join("mgr"), Role::Manager);
    let user_certs = issue(&ca, &d.join("user"), Role::User);
    // The load generator runs on one thread, so that it leaves a core to the manager.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // ---- agent RSS ----
    let aport = free_port();
    let acfg = d.join("agent.cfg");
    let a = |s: &str| d.join("agent").join(s).display().to_string();
    std::fs::write(
        &acfg,
        format!(
            "[agent]\nTYPE = helloworld\nUSER_ID = 1\nAPP_ID = 1\nBIND = 127.0.0.1\nPORT = {aport}\nLOG_FILE = {}\n\
             ETC = {}\nCERT_DIR = {}\nVAR_TMP = {}\nVAR_CACHE = {}\nVAR_RUN = {}\n",
            a("agent.log"),
            a("etc"),
            a("certs"),
            a("tmp"),
            a("cache"),
            a("run")
        ),
    )
    .unwrap();
    let agent = Guard(
        Command::new(CPS)
            .args(["agent", "-c"])
            .arg(&acfg)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ac = RpcClient::new(
        pki::client_config(
            &mgr_certs,
            PeerRule {
                roles: vec![Role::Agent],
                uid: 1,
                app: Some(1),
            },
        )
        .unwrap(),
        format!("127.0.0.1:{aport}"),
    );
    rt.block_on(async {
        wait_up(&ac, "check_process").await;
        for _ in 0..50 {
            ac.get(0, "get_helloworld", &json!({})).await.unwrap();
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_kb(agent.0.id());
    println!(
        "agent RSS at idle (after 50 calls): {:.1} MB ({rss} kB)",
        rss as f64 / 1024.0
    );
    drop(agent);

    // ---- manager throughput / latency ----
    let m = |s: &str| d.join(s).display().to_string();
    let mcfg = d.join("manager.cfg");
    std::fs::write(
        &mcfg,
        format!(
            "[manager]\nUSER_ID = 1\nAPP_ID = 1\nBIND = 127.0.0.1\nPORT = 0\nENROLL_PORT = 0\nLOG_FILE = {}\n\
             CERT_DIR = {}\nCA_DIR = {}\nVAR_RUN = {}\nVAR_CACHE = {}\n",
            m("manager.log"),
            m("mgr"),
            m("ca"),
            m("run"),
            m("cache")
        ),
    )
    .unwrap();
    let mgr = Guard(
        Command::new(CPS)
            .args(["manager", "-c"])
            .arg(&mcfg)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ports = d.join("run/ports.json");
    let start = Instant::now();
    while !ports.exists() {
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ports).unwrap()).unwrap();
    let addr = format!("127.0.0.1:{}", v["port"]);
    let tls = pki::client_config(
        &user_certs,
        PeerRule {
            roles: vec![Role::Manager],
            uid: 1,
            app: Some(1),
        },
    )
    .unwrap();
    let c = Arc::new(RpcClient::new(tls, addr));
    let mgr_pid = mgr.0.id();
    rt.block_on(async {
        wait_up(&c, "get_service_info").await;

        // warm: N keep-alive connections, N concurrent calls per round
        let mut conns = Vec::with_capacity(N);
        for _ in 0..N {
            conns.push(c.connect().await.unwrap());
        }
        const ROUNDS: usize = 11;
        let mut cpu0 = 0.0;
        for round in 0..ROUNDS {
            if round == 1 {
                cpu0 = cpu_secs(mgr_pid);
            }
            let start_gate = Arc::new(tokio::sync::Barrier::new(N));
            let wall = Instant::now();
            let tasks: Vec<_> = conns
                .drain(..)
                .map(|mut conn| {
                    let gate = start_gate.clone();
                    tokio::spawn(async move {
                        gate.wait().await;
                        let t = Instant::now();
                        let r = conn.get(0, "get_service_info", &json!({})).await.unwrap();
                        assert_eq!(r["state"], "INIT");
                        (t.elapsed(), conn)
                    })
                })
                .collect();
            let mut lat = Vec::with_capacity(N);
            for t in tasks {
                let (l, conn) = t.await.unwrap();
                lat.push(l);
                conns.push(conn);
            }
            if round > 0 {
                report(
                    &format!("warm (keep-alive) round {round}"),
                    lat,
                    wall.elapsed(),
                );
            }
        }
        let cpu = cpu_secs(mgr_pid) - cpu0;
        let calls = (ROUNDS - 1) * N;
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "manager CPU (user+sys) per warm call: {:.1} us ({calls} calls, {:.2} s); load average {}",
            cpu / calls as f64 * 1e6,
            cpu,
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
        drop(conns);

        // cold: a fresh TLS connection per call
        let wall = Instant::now();
        let tasks: Vec<_> = (0..N)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    c.get(0, "get_service_info", &json!({})).await.unwrap();
                    t.elapsed()
                })
            })
            .collect();
        let mut lat = Vec::with_capacity(N);
        for t in tasks {
            lat.push(t.await.unwrap());
        }
        report("cold (handshake per call)", lat, wall.elapsed());
    });
    println!(
        "manager RSS after the runs: {:.1} MB",
        rss_kb(mgr.0.id()) as f64 / 1024.0
    );
    drop(mgr);
}
