//! ConPaaS runtime: manager, agent and client over mutual TLS (binary: `cps`).

pub mod agent;
pub mod args;
pub mod bootctx;
pub mod client;
pub mod cloud;
pub mod cloudcfg;
pub mod config;
pub mod context;
pub mod controller;
#[cfg(feature = "clouds")]
pub mod ec2;
pub mod enrol;
pub mod imds;
pub mod manager;
#[cfg(feature = "clouds")]
pub mod openstack;
pub mod pki;
pub mod qemu;
pub mod rpc;
pub mod services;
pub mod status;
pub mod testkit;

/// Logs to `file` (appending) or to stderr; `RUST_LOG` overrides the level (default info).
pub fn init_logging(file: Option<&std::path::Path>) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    match file {
        Some(f) => {
            if let Some(d) = f.parent() {
                std::fs::create_dir_all(d)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)?;
            let _ = b.with_writer(std::sync::Mutex::new(file)).try_init();
        }
        None => {
            let _ = b.with_writer(std::io::stderr).try_init();
        }
    }
    Ok(())
}
