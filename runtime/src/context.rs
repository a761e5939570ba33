//! Contextualization: the config file and the user-data script of a node, rendered from the
//! `config/` tree with tera.
//!
//! Script order (as the original, §2.8.1): cloud script, setup (directories + CA certificate —
//! the original's three pem heredocs minus the private key), config heredoc
//! (`default-<role>.cfg` + `<type>-<role>.cfg` annex), the user's startup script, start script
//! (`cps enroll` with the one-time token, then `cps <role> -c config.cfg`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::pki::Role;

/// Everything a node's context needs.
#[derive(Clone, Debug, Serialize)]
pub struct NodeVars {
    pub role: Role,
    pub service_type: String,
    pub deployment_name: String,
    pub user_id: u64,
    pub app_id: u64,
    pub service_id: u64,
    pub node_id: String,
    pub manager_ip: String,
    pub enroll_url: String,
    pub token: String,
    pub ca_cert_pem: String,
    pub port: u16,
    /// Service-specific replacements for the annex (helloworld: `STRING`).
    pub replacements: BTreeMap<String, String>,
    pub startup_script: Option<String>,
}

/// Where the node keeps its files and which address it reports.
#[derive(Clone, Debug, Serialize)]
pub struct NodePaths {
    pub my_ip: String,
    pub bind: String,
    pub log_file: String,
    pub etc: String,
    pub cert_dir: String,
    pub var_tmp: String,
    pub var_cache: String,
    pub var_run: String,
    pub conpaas_home: String,
}

impl NodePaths {
    /// Shell variables resolved at boot by the setup and cloud scripts (VM contexts).
    pub fn boot_time() -> Self {
        NodePaths {
            my_ip: "$IP_PUBLIC".into(),
            bind: "0.0.0.0".into(),
            log_file: "$LOG_FILE".into(),
            etc: "$ETC".into(),
            cert_dir: "$CERT_DIR".into(),
            var_tmp: "$VAR_TMP".into(),
            var_cache: "$VAR_CACHE".into(),
            var_run: "$VAR_RUN".into(),
            conpaas_home: "$CPS_HOME".into(),
        }
    }

    /// Concrete paths under `dir` (local driver, tests).
    pub fn under(dir: &Path, role: Role) -> Self {
        let d = |s: &str| dir.join(s).display().to_string();
        NodePaths {
            my_ip: "127.0.0.1".into(),
            bind: "127.0.0.1".into(),
            log_file: d(&format!("cps{role}.log")),
            etc: d("etc"),
            cert_dir: d("certs"),
            var_tmp: d("tmp"),
            var_cache: d("cache"),
            var_run: d("run"),
            conpaas_home: d("home"),
        }
    }

    pub fn create_dirs(&self) -> Result<()> {
        for p in [
            &self.etc,
            &self.cert_dir,
            &self.var_tmp,
            &self.var_cache,
            &self.var_run,
            &self.conpaas_home,
        ] {
            std::fs::create_dir_all(p).with_context(|| format!("creating {p}"))?;
        }
        Ok(())
    }
}

/// The `config/` tree.
#[derive(Clone, Debug)]
pub struct ConfigTree {
    pub dir: PathBuf,
}

fn render(template: &str, name: &str, ctx: &tera::Context) -> Result<String> {
    tera::Tera::one_off(template, ctx, false).map_err(|e| {
        let mut msg = format!("rendering {name}: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        anyhow::anyhow!(msg)
    })
}

impl ConfigTree {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ConfigTree { dir: dir.into() }
    }

    /// The `config/` directory next to the executable's source tree, or `$CPS_CONFIG_DIR`.
    pub fn locate() -> Result<Self> {
        if let Ok(d) = std::env::var("CPS_CONFIG_DIR") {
            return Ok(ConfigTree::new(d));
        }
        for c in ["/etc/cps/config", "/usr/local/share/cps/config"] {
            if Path::new(c).join("agent").is_dir() {
                return Ok(ConfigTree::new(c));
            }
        }
        let dev = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        if dev.join("agent").is_dir() {
            return Ok(ConfigTree::new(dev));
        }
        bail!("cannot find the config/ tree; set CPS_CONFIG_DIR")
    }

    fn read(&self, rel: &str) -> Result<String> {
        let p = self.dir.join(rel);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    }

    fn read_opt(&self, rel: &str) -> Result<Option<String>> {
        let p = self.dir.join(rel);
        if p.exists() {
            Ok(Some(self.read(rel)?))
        } else {
            Ok(None)
        }
    }

    fn tera_ctx(vars: &NodeVars, paths: &NodePaths) -> Result<tera::Context> {
        let mut ctx = tera::Context::from_serialize(vars)?;
        ctx.extend(tera::Context::from_serialize(paths)?);
        for (k, v) in &vars.replacements {
            ctx.insert(k.as_str(), v);
        }
        Ok(ctx)
    }

    /// The node's config file: `default-<role>.cfg` followed by the service annex.
    pub fn render_config(&self, vars: &NodeVars, paths: &NodePaths) -> Result<String> {
        let role = vars.role.as_str();
        let ctx = Self::tera_ctx(vars, paths)?;
        let base_name = format!("{role}/default-{role}.cfg");
        let mut out = render(&self.read(&base_name)?, &base_name, &ctx)?;
        let annex_name = format!("{role}/{}-{role}.cfg", vars.service_type);
        if let Some(annex) = self.read_opt(&annex_name)? {
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&render(&annex, &annex_name, &ctx)?);
        }
        Ok(out)
    }

    /// The full user-data script for `cloud` (`local`, `qemu`, `ec2`, `openstack`).
    pub fn render_script(&self, vars: &NodeVars, cloud: &str) -> Result<String> {
        let paths = NodePaths::boot_time();
        let ctx = Self::tera_ctx(vars, &paths)?;
        let mut out = String::from("#!/bin/bash\n# ConPaaS contextualization\n");
        let cloud_name = format!("templates/cloud/{cloud}.sh");
        match self.read_opt(&cloud_name)? {
            Some(t) => out.push_str(&render(&t, &cloud_name, &ctx)?),
            None => bail!("no cloud script for cloud type '{cloud}' ({cloud_name})"),
        }
        out.push_str(&render(
            &self.read("templates/setup.sh")?,
            "setup.sh",
            &ctx,
        )?);
        let config = self.render_config(vars, &paths)?;
        if config.lines().any(|l| l.trim() == "EOF") {
            bail!("config contains a line 'EOF'");
        }
        out.push_str("cat <<EOF > $ROOT_DIR/config.cfg\n");
        out.push_str(&config);
        if !config.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("EOF\n");
        if let Some(s) = &vars.startup_script {
            out.push_str("# user startup script\n");
            out.push_str(s);
            if !s.ends_with('\n') {
                out.push('\n');
            }
        }
        let start = match self.read_opt(&format!(
            "templates/{}-{}-start.sh",
            vars.service_type, vars.role
        ))? {
            Some(s) => s,
            None => self.read("templates/start.sh")?,
        };
        out.push_str(&render(&start, "start.sh", &ctx)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> NodeVars {
        NodeVars {
            role: Role::Agent,
            service_type: "helloworld".into(),
            deployment_name: "dep".into(),
            user_id: 3,
            app_id: 7,
            service_id: 1,
            node_id: "iaas12".into(),
            manager_ip: "10.0.0.1".into(),
            enroll_url: "https://10.0.0.1:4443/enroll".into(),
            token: "tok123".into(),
            ca_cert_pem: "-----BEGIN CERTIFICATE-----\nABC\n-----END CERTIFICATE-----\n".into(),
            port: 5555,
            replacements: [("STRING".to_string(), "hello there".to_string())].into(),
            startup_script: Some("echo user-script".into()),
        }
    }

    #[test]
    fn agent_config_is_default_plus_annex() {
        let tree = ConfigTree::locate().unwrap();
        let cfg = tree
            .render_config(&vars(), &NodePaths::boot_time())
            .unwrap();
        let ini = crate::config::Ini::parse(&cfg).unwrap();
        assert_eq!(ini.get("agent", "TYPE").unwrap(), "helloworld");
        assert_eq!(ini.get("agent", "USER_ID").unwrap(), "3");
        assert_eq!(ini.get("agent", "LOG_FILE").unwrap(), "$LOG_FILE");
        assert_eq!(ini.get("agent", "MY_IP").unwrap(), "$IP_PUBLIC");
        assert_eq!(
            ini.get("agent", "STRING_TO_GENERATE").unwrap(),
            "hello there"
        );
        let mut v = vars();
        v.replacements.clear();
        let cfg = tree.render_config(&v, &NodePaths::boot_time()).unwrap();
        assert!(cfg.contains("STRING_TO_GENERATE = helloworld"));
    }

    #[test]
    fn script_parts_come_in_the_original_order() {
        let tree = ConfigTree::locate().unwrap();
        let s = tree.render_script(&vars(), "ec2").unwrap();
        let pos = |needle: &str| {
            s.find(needle)
                .unwrap_or_else(|| panic!("missing {needle} in\n{s}"))
        };
        let cloud = pos("169.254.169.254");
        let setup = pos("mkdir -p $ETC");
        let config = pos("cat <<EOF > $ROOT_DIR/config.cfg");
        let user = pos("echo user-script");
        let start = pos("enroll --url 'https://10.0.0.1:4443/enroll' --token 'tok123'");
        assert!(cloud < setup && setup < config && config < user && user < start);
        assert!(s.starts_with("#!/bin/bash"));
        assert!(!s.contains("PRIVATE KEY"));
        assert!(s.contains("-----BEGIN CERTIFICATE-----\nABC"));
        assert!(tree.render_script(&vars(), "nosuchcloud").is_err());
        // a manager VM's context renders too
        let mut m = vars();
        m.role = Role::Manager;
        m.startup_script = None;
        let s = tree.render_script(&m, "openstack").unwrap();
        let cfg = &s[s.find("cat <<EOF").unwrap()..];
        assert!(
            cfg.contains("[manager]")
                && cfg.contains("LOG_FILE = $LOG_FILE")
                && cfg.contains("CA_DIR = $ETC/ca")
        );
        assert!(s.contains("LOG_FILE=/var/log/cpsmanager.log") && s.contains("$CPS manager -c"));
        // the script is valid shell
        let out = std::process::Command::new("bash")
            .arg("-n")
            .arg("-c")
            .arg(&s)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
