//! `cps`: ConPaaS manager, agent, client, CA and enrolment tool.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use serde_json::{json, Value};

use runtime::client::RpcClient;
use runtime::config::Ini;
use runtime::context::{ConfigTree, NodePaths, NodeVars};
use runtime::pki::{self, Ca, CertPaths, Identity, PeerRule, Role, Validity};

#[derive(Parser)]
#[command(
    name = "cps",
    version,
    about = "ConPaaS runtime: manager, agent and client over mutual TLS"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the service manager.
    Manager(ServerOpts),
    /// Run an agent.
    Agent(ServerOpts),
    /// Talk to a manager.
    Client(ClientOpts),
    /// Certificate authority.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Node side of the enrolment: generate a key, redeem the one-time token, store the certificate.
    Enroll {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        node_id: String,
        /// Where cert.pem, key.pem, ca_cert.pem are written.
        #[arg(long)]
        cert_dir: PathBuf,
        /// CA certificate authenticating the manager (default: <cert-dir>/ca_cert.pem).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Contextualization.
    #[command(subcommand)]
    Context(ContextCmd),
    /// Test aid for the local cloud: listen on a port and never answer.
    #[command(hide = true)]
    DeadNode {
        #[arg(long)]
        port: u16,
    },
    /// qemu guest forward: copy stdin/stdout to and from a TCP address.
    #[command(hide = true)]
    Relay { addr: String },
}

#[derive(ClapArgs)]
struct ServerOpts {
    /// Configuration file.
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// Port (overrides PORT in the config; defaults: manager 443, agent 5555).
    #[arg(short = 'p', long)]
    port: Option<u16>,
    /// Address to bind (overrides BIND; default 0.0.0.0).
    #[arg(short = 'b', long)]
    bind: Option<String>,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a CA (ca_cert.pem, ca_key.pem) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "ConPaaS CA")]
        cn: String,
        #[arg(long, default_value_t = 1825)]
        days: i64,
    },
    /// Issue a certificate and key (cert.pem, key.pem, ca_cert.pem in OUT).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        role: Role,
        #[arg(long)]
        uid: u64,
        #[arg(long)]
        app: u64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        cn: Option<String>,
        #[arg(long, default_value_t = 365)]
        days: i64,
    },
}

#[derive(Subcommand)]
enum ContextCmd {
    /// Render a node's user-data script (or only its config file).
    Render {
        #[arg(long, env = "CPS_CONFIG_DIR")]
        config_dir: Option<PathBuf>,
        #[arg(long, default_value = "agent")]
        role: Role,
        #[arg(long = "type", default_value = "helloworld")]
        service_type: String,
        #[arg(long, default_value = "conpaas")]
        deployment: String,
        #[arg(long)]
        uid: u64,
        #[arg(long)]
        app: u64,
        #[arg(long, default_value_t = 1)]
        sid: u64,
        #[arg(long)]
        node_id: String,
        #[arg(long)]
        manager_ip: String,
        #[arg(long)]
        enroll_url: String,
        #[arg(long)]
        token: String,
        /// CA certificate file to embed.
        #[arg(long)]
        ca_cert: PathBuf,
        #[arg(long, default_value = "ec2")]
        cloud: String,
        #[arg(long, default_value_t = 5555)]
        port: u16,
        /// Service replacements for the annex, KEY=VALUE (helloworld: STRING=...).
        #[arg(long = "set")]
        set: Vec<String>,
        #[arg(long)]
        startup_script: Option<PathBuf>,
        /// Print only the rendered config file.
        #[arg(long)]
        config_only: bool,
    },
    /// Boot-time contextualization: SSH keys, host name, user-data (once per instance).
    Apply(runtime::bootctx::ApplyArgs),
}

#[derive(ClapArgs)]
struct ClientOpts {
    /// Manager URL, https://host:port (with a manager certificate, an agent's URL works too).
    #[arg(long, env = "CPS_MANAGER")]
    manager: String,
    /// Directory with cert.pem, key.pem, ca_cert.pem.
    #[arg(long, env = "CPS_CERT_DIR")]
    cert_dir: Option<PathBuf>,
    #[arg(long, env = "CPS_CERT")]
    cert: Option<PathBuf>,
    #[arg(long, env = "CPS_KEY")]
    key: Option<PathBuf>,
    #[arg(long, env = "CPS_CA")]
    ca: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    service_id: u64,
    /// Print raw JSON results.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: ClientCmd,
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Call any method.
    Call {
        method: String,
        /// Parameter KEY=VALUE (VALUE parsed as JSON when possible).
        #[arg(long = "param", short = 'P')]
        params: Vec<String>,
        /// Use POST (default GET).
        #[arg(long)]
        post: bool,
    },
    /// UPLOAD files (multipart/form-data), e.g. `upload upload_code_version -F code=app.tar.gz`.
    Upload {
        method: String,
        /// File field FIELD=PATH (repeatable).
        #[arg(long = "file", short = 'F', required = true)]
        files: Vec<String>,
        /// Plain field KEY=VALUE.
        #[arg(long = "param", short = 'P')]
        params: Vec<String>,
    },
    /// Service state and type.
    Info,
    /// Start the service.
    Startup {
        #[arg(long)]
        cloud: Option<String>,
    },
    /// Add N nodes (in the cloud named by --cloud; default: the default cloud).
    AddNodes {
        count: u64,
        #[arg(long)]
        cloud: Option<String>,
    },
    /// Remove N nodes.
    RemoveNodes { count: u64 },
    /// List nodes.
    List,
    /// Ask every agent for its hello.
    Hello,
    /// State history.
    History,
    /// Manager log.
    Log,
    /// Stop the service.
    Stop,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn load_ini(path: &Path) -> Result<Ini> {
    if !path.is_file() {
        bail!("Failed to find configuration file {}", path.display());
    }
    Ini::load(path)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Agent(o) => {
            let mut ini = load_ini(&o.config)?;
            if let Some(p) = o.port {
                ini.set("agent", "PORT", &p.to_string());
            }
            if let Some(b) = &o.bind {
                ini.set("agent", "BIND", b);
            }
            let cfg = runtime::agent::AgentConfig::from_ini(&ini)?;
            runtime::init_logging(Some(&cfg.log_file))?;
            // Lean: one thread.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(runtime::agent::run(cfg, &ini))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Manager(o) => {
            let mut ini = load_ini(&o.config)?;
            if let Some(p) = o.port {
                ini.set("manager", "PORT", &p.to_string());
            }
            if let Some(b) = &o.bind {
                ini.set("manager", "BIND", b);
            }
            let cfg = runtime::manager::ManagerConfig::from_ini(&ini)?;
            runtime::init_logging(Some(&cfg.log_file))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async {
                let running = runtime::manager::start(&cfg).await?;
                println!(
                    "cps manager listening on {} (enrolment on {})",
                    running.rpc_addr, running.enroll_addr
                );
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                tracing::info!("shutting down");
                running.manager.shutdown().await;
                for c in &running.local_clouds {
                    c.kill_all();
                }
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Relay { addr } => {
            runtime::qemu::relay(&addr, std::io::stdin(), std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DeadNode { port } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(runtime::agent::dead_node(port))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ca(CaCmd::Init { dir, cn, days }) => {
            if dir.join(pki::CA_KEY_FILE).exists() {
                bail!("{} already holds a CA", dir.display());
            }
            let ca = Ca::generate(&cn, days)?;
            ca.save(&dir)?;
            println!("CA created in {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ca(CaCmd::Issue {
            dir,
            role,
            uid,
            app,
            out,
            cn,
            days,
        }) => {
            let ca = Ca::load(&dir)?;
            let id = Identity { role, uid, app };
            let cn = cn.unwrap_or_else(|| format!("{role}-u{uid}-a{app}"));
            let (cert, key) = ca.issue(&id, &cn, Validity::days(days))?;
            std::fs::create_dir_all(&out)?;
            let p = CertPaths::in_dir(&out);
            pki::write_file(&p.cert, &cert, 0o644)?;
            pki::write_file(&p.key, &key, 0o600)?;
            pki::write_file(&p.ca, &ca.cert_pem, 0o644)?;
            println!("issued {} into {}", id.urn(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Enroll {
            url,
            token,
            node_id,
            cert_dir,
            ca,
        } => {
            let ca = ca.unwrap_or_else(|| cert_dir.join(pki::CA_CERT_FILE));
            let ca_pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let id = rt.block_on(runtime::enrol::enroll(
                &url, &token, &node_id, &ca_pem, &cert_dir,
            ))?;
            println!("enrolled as {}", id.urn());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Context(ContextCmd::Render {
            config_dir,
            role,
            service_type,
            deployment,
            uid,
            app,
            sid,
            node_id,
            manager_ip,
            enroll_url,
            token,
            ca_cert,
            cloud,
            port,
            set,
            startup_script,
            config_only,
        }) => {
            let tree = match config_dir {
                Some(d) => ConfigTree::new(d),
                None => ConfigTree::locate()?,
            };
            let mut replacements = std::collections::BTreeMap::new();
            for kv in set {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--set expects KEY=VALUE, got '{kv}'"))?;
                replacements.insert(k.to_string(), v.to_string());
            }
            let vars = NodeVars {
                role,
                service_type,
                deployment_name: deployment,
                user_id: uid,
                app_id: app,
                service_id: sid,
                node_id,
                manager_ip,
                enroll_url,
                token,
                ca_cert_pem: std::fs::read_to_string(&ca_cert)
                    .with_context(|| format!("reading {}", ca_cert.display()))?,
                port,
                replacements,
                startup_script: match startup_script {
                    Some(p) => Some(
                        std::fs::read_to_string(&p)
                            .with_context(|| format!("reading {}", p.display()))?,
                    ),
                    None => None,
                },
            };
            let out = if config_only {
                tree.render_config(&vars, &NodePaths::boot_time())?
            } else {
                tree.render_script(&vars, &cloud)?
            };
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Context(ContextCmd::Apply(a)) => Ok(runtime::bootctx::run_cli(&a)),
        Cmd::Client(o) => client(o),
    }
}

fn client_paths(o: &ClientOpts) -> Result<CertPaths> {
    let mut p = match &o.cert_dir {
        Some(d) => CertPaths::in_dir(d),
        None => CertPaths {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            ca: PathBuf::new(),
        },
    };
    if let Some(c) = &o.cert {
        p.cert = c.clone();
    }
    if let Some(k) = &o.key {
        p.key = k.clone();
    }
    if let Some(c) = &o.ca {
        p.ca = c.clone();
    }
    if p.cert.as_os_str().is_empty() || p.key.as_os_str().is_empty() || p.ca.as_os_str().is_empty()
    {
        bail!("client certificate, key and CA are required (--cert-dir, or --cert/--key/--ca, or CPS_CERT_DIR)");
    }
    Ok(p)
}

fn manager_addr(url: &str) -> Result<String> {
    let u = url::Url::parse(url).with_context(|| format!("bad manager URL '{url}'"))?;
    if u.scheme() != "https" {
        bail!("manager URL must start with https://");
    }
    let host = u
        .host_str()
        .ok_or_else(|| anyhow!("manager URL without host"))?;
    Ok(format!(
        "{host}:{}",
        u.port_or_known_default().unwrap_or(443)
    ))
}

fn parse_param(kv: &str) -> Result<(String, Value)> {
    let (k, v) = kv
        .split_once('=')
        .ok_or_else(|| anyhow!("--param expects KEY=VALUE, got '{kv}'"))?;
    let val = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((k.to_string(), val))
}

fn client(o: ClientOpts) -> Result<ExitCode> {
    let paths = client_paths(&o)?;
    let me = paths.identity().context("reading the client certificate")?;
    // As the README's rules say: a user expects a manager of its user; a manager (e.g. an
    // operator holding the manager's certificate) expects a manager or an agent of its user
    // and application, so it can call an agent directly.
    let rule = match me.role {
        Role::Manager => PeerRule::agent_server(me.uid, me.app),
        _ => PeerRule {
            roles: vec![Role::Manager],
            uid: me.uid,
            app: if me.app == 0 { None } else { Some(me.app) },
        },
    };
    let tls = pki::client_config(&paths, rule)?;
    let c = RpcClient::new(tls, manager_addr(&o.manager)?);
    let sid = o.service_id;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nodes = |n: u64| json!({"nodes": {"node": n}});
    let (result, friendly): (Result<Value, _>, fn(&Value) -> String) = rt.block_on(async {
        match &o.cmd {
            ClientCmd::Call {
                method,
                params,
                post,
            } => {
                let mut m = serde_json::Map::new();
                for p in params {
                    let (k, v) = parse_param(p)?;
                    m.insert(k, v);
                }
                let p = Value::Object(m);
                let r = if *post {
                    c.post(sid, method, &p).await
                } else {
                    c.get(sid, method, &p).await
                };
                anyhow::Ok((r, pretty as fn(&Value) -> String))
            }
            ClientCmd::Upload {
                method,
                files,
                params,
            } => {
                let mut loaded = Vec::new();
                for f in files {
                    let (field, path) = f
                        .split_once('=')
                        .ok_or_else(|| anyhow!("--file expects FIELD=PATH, got '{f}'"))?;
                    let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
                    let name = Path::new(path)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    loaded.push((field.to_string(), name, data));
                }
                let mut fields = Vec::new();
                for p in params {
                    let (k, v) = p
                        .split_once('=')
                        .ok_or_else(|| anyhow!("--param expects KEY=VALUE, got '{p}'"))?;
                    fields.push((k.to_string(), v.to_string()));
                }
                let f: Vec<(&str, &str)> = fields
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let l: Vec<(&str, &str, &[u8])> = loaded
                    .iter()
                    .map(|(k, n, d)| (k.as_str(), n.as_str(), d.as_slice()))
                    .collect();
                Ok((c.upload(sid, method, &f, &l).await, pretty as _))
            }
            ClientCmd::Info => Ok((
                c.get(sid, "get_service_info", &json!({})).await,
                fmt_info as fn(&Value) -> String,
            )),
            ClientCmd::Startup { cloud } => {
                let p = match cloud {
                    Some(cl) => json!({"cloud": cl}),
                    None => json!({}),
                };
                Ok((
                    c.post(sid, "startup", &p).await,
                    fmt_state as fn(&Value) -> String,
                ))
            }
            ClientCmd::AddNodes { count, cloud } => {
                let mut p = nodes(*count);
                if let Some(cl) = cloud {
                    p["cloud"] = json!(cl);
                }
                Ok((c.post(sid, "add_nodes", &p).await, fmt_state as _))
            }
            ClientCmd::RemoveNodes { count } => Ok((
                c.post(sid, "remove_nodes", &nodes(*count)).await,
                fmt_state as _,
            )),
            ClientCmd::List => Ok((c.get(sid, "list_nodes", &json!({})).await, fmt_list as _)),
            ClientCmd::Hello => Ok((
                c.get(sid, "get_helloworld", &json!({})).await,
                fmt_hello as _,
            )),
            ClientCmd::History => Ok((
                c.get(sid, "get_service_history", &json!({})).await,
                fmt_history as _,
            )),
            ClientCmd::Log => Ok((c.get(sid, "get_log", &json!({})).await, fmt_log as _)),
            ClientCmd::Stop => Ok((c.post(sid, "stop", &json!({})).await, fmt_state as _)),
        }
    })?;
    match result {
        Ok(v) => {
            if o.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", friendly(&v));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(match e {
                runtime::client::ClientError::Rpc(_) => 3,
                _ => 2,
            }))
        }
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
        None => "-".into(),
    }
}

fn fmt_info(v: &Value) -> String {
    format!(
        "{:<8}{}\n{:<8}{}",
        "state",
        s(v, "state"),
        "type",
        s(v, "type")
    )
}

fn fmt_state(v: &Value) -> String {
    format!("state: {}", s(v, "state"))
}

fn fmt_list(v: &Value) -> String {
    let mut out = format!("{:<12}NODE", "ROLE");
    if let Some(m) = v.as_object() {
        for (role, ids) in m {
            for id in ids.as_array().into_iter().flatten() {
                out.push_str(&format!("\n{:<12}{}", role, id.as_str().unwrap_or("")));
            }
        }
    }
    out
}

fn fmt_hello(v: &Value) -> String {
    s(v, "helloworld")
}

fn fmt_log(v: &Value) -> String {
    s(v, "log")
}

fn fmt_history(v: &Value) -> String {
    let mut out = format!("{:<20}{:<10}REASON", "TIME", "STATE");
    for e in v
        .get("state_log")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "\n{:<20}{:<10}{}",
            s(e, "time"),
            s(e, "state"),
            s(e, "reason")
        ));
    }
    out
}
