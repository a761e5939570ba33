//! `nutshell`: turns the outer image into a Nutshell — a bootable machine that runs
//! the ConPaaS manager and starts its agents *inside itself*, from the services image
//! built earlier in the same run (the embedded image):
//!
//! - `embed = container`: the embedded root tree goes to
//!   `/var/lib/cps/nutshell/rootfs`; the manager's `nspawn` driver starts each agent
//!   with `systemd-nspawn --volatile=overlay` on it (read-only tree, writes in tmpfs),
//!   sharing the Nutshell's network.
//! - `embed = vm`: the embedded disk image goes to `/var/lib/cps/nutshell/agent.img`;
//!   the manager's `qemu` driver boots each agent as a nested VM from a copy-on-write
//!   overlay of it, with a per-node config drive.
//!
//! No devstack, no OpenStack inside: the original's Nutshell needed both.
//!
//! At boot, `cps-nutshell.service` (after the contextualization unit) creates the
//! manager's CA and certificate on first start, writes the manager config and starts
//! the manager. Users get a certificate through the same one-time-token enrolment as
//! nodes: user-data writes a token to `/etc/cps/nutshell-user-token`, and the
//! manager's CA certificate — needed to authenticate the enrolment endpoint — is
//! printed on the console, where clouds make it available (EC2 GetConsoleOutput,
//! OpenStack console log). No private key ever travels in user-data.

use super::{Ctx, StageOps, StageResult};
use crate::host::chroot::ChrootSession;
use crate::recipe::Layout;
use serde_json::json;

pub const NUTSHELL_DIR: &str = "var/lib/cps/nutshell";

pub struct Nutshell {
    /// What is embedded: `Layout::Container` (a root tree) or `Layout::Disk` (a VM image).
    pub embed: Layout,
    /// Cache key of the embedded image's last stage (set by the planner), so that the
    /// Nutshell layer changes whenever the embedded image does.
    pub inner_key: String,
    /// Service type the manager runs (the embedded image's first service).
    pub service: String,
}

const UNIT: &str = "[Unit]
Description=ConPaaS Nutshell manager (agents run inside this machine)
After=cps-context.service network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/cps-nutshell
Restart=on-failure
RestartSec=3

[Install]
WantedBy=multi-user.target
";

impl Nutshell {
    /// Debian packages the Nutshell needs on top of the image's own.
    pub fn packages(&self) -> Vec<&'static str> {
        match self.embed {
            Layout::Container => vec!["systemd-container"],
            // genisoimage: the qemu driver writes each node's config drive with it.
            _ => vec!["qemu-system-x86", "qemu-utils", "genisoimage"],
        }
    }

    fn start_script(&self) -> String {
        let (cloud, driver_cfg) = match self.embed {
            Layout::Container => (
                "nspawn",
                format!("NSPAWN_ROOTFS = /{NUTSHELL_DIR}/rootfs\n"),
            ),
            _ => (
                "qemu",
                format!(
                    "\n[qemu]\nIMAGE = /{NUTSHELL_DIR}/agent.img\nACCEL = auto\nMEMORY = 512\n"
                ),
            ),
        };
        format!(
            r#"#!/bin/sh
# Starts the Nutshell's ConPaaS manager (written by mkimage's nutshell stage).
set -eu
D=/{NUTSHELL_DIR}/manager
mkdir -p "$D"
if [ ! -f "$D/ca/ca_cert.pem" ]; then
    rm -rf "$D/ca" "$D/certs"
    cps ca init --dir "$D/ca"
    cps ca issue --dir "$D/ca" --role manager --uid 1 --app 1 --out "$D/certs"
fi
TOKEN=""
if [ -f /etc/cps/nutshell-user-token ]; then
    TOKEN=$(tr -cd '0-9A-Za-z' < /etc/cps/nutshell-user-token)
fi
cat > "$D/manager.cfg" <<EOF
[manager]
TYPE = {service}
USER_ID = 1
APP_ID = 1
BIND = 0.0.0.0
MY_IP = 127.0.0.1
PORT = 443
ENROLL_PORT = 4443
LOG_FILE = /var/log/cpsmanager.log
CERT_DIR = $D/certs
CA_DIR = $D/ca
VAR_RUN = /run/cps-nutshell
VAR_CACHE = $D/cache
CONFIG_DIR = /usr/share/cps/config
CLOUD = {cloud}
CLOUD_NAME = nutshell
STARTING_NODES = 0
USER_TOKEN = $TOKEN
{driver_cfg}EOF
# The CA authenticates this manager's enrolment endpoint to users: publish it on
# the console (a channel the cloud authenticates), never a private key.
for tty in /dev/ttyS0 /dev/hvc0; do
    if [ -w "$tty" ]; then
        {{ echo "cps-nutshell: manager CA certificate follows"; cat "$D/ca/ca_cert.pem"; echo "cps-nutshell: end of CA certificate"; }} > "$tty" 2>/dev/null || true
    fi
done
exec cps manager -c "$D/manager.cfg"
"#,
            service = self.service,
        )
    }
}

impl StageOps for Nutshell {
    fn name(&self) -> String {
        "nutshell".into()
    }

    fn describe(&self) -> String {
        match self.embed {
            Layout::Container => "embed the services image as a container rootfs; manager with the nspawn driver (+ systemd-container)".into(),
            _ => "embed the services image as a VM disk; manager with the nested qemu driver (+ qemu)".into(),
        }
    }

    fn cacheable(&self) -> bool {
        true
    }

    fn inputs(&self) -> serde_json::Value {
        json!({
            "embed": self.embed,
            "embedded_image_key": self.inner_key,
            "service": self.service,
            "packages": self.packages(),
            // Digests keep `plan` readable; any change still changes the key.
            "unit_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(UNIT)),
            "script_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(self.start_script())),
        })
    }

    fn check(&self, _ctx: &Ctx) -> StageResult {
        if !matches!(self.embed, Layout::Container | Layout::Disk) {
            anyhow::bail!("a Nutshell embeds a container or a VM image");
        }
        Ok(())
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        let src = ctx.embedded.clone().ok_or_else(|| {
            anyhow::anyhow!("the embedded image was not built before the nutshell stage")
        })?;
        let chroot = ChrootSession::enter(&ctx.rootfs)?;
        super::fail_point("nutshell")?;
        chroot.cmd("apt-get").args(["-q", "update"]).run()?;
        let pkgs: Vec<String> = self.packages().iter().map(|s| s.to_string()).collect();
        chroot.apt_install(&pkgs)?;
        chroot.exit()?;

        let dir = ctx.root_path(NUTSHELL_DIR);
        std::fs::create_dir_all(&dir)?;
        match self.embed {
            Layout::Container => {
                crate::cache::copy_tree(&src, &dir.join("rootfs"))?;
            }
            _ => {
                crate::host::Cmd::new("cp")
                    .arg("--sparse=always")
                    .arg(&src)
                    .arg(dir.join("agent.img"))
                    .run()?;
            }
        }
        ctx.write_file("usr/local/sbin/cps-nutshell", &self.start_script())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            ctx.root_path("usr/local/sbin/cps-nutshell"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        ctx.write_file("etc/systemd/system/cps-nutshell.service", UNIT)?;
        let wants = ctx.root_path("etc/systemd/system/multi-user.target.wants");
        std::fs::create_dir_all(&wants)?;
        let link = wants.join("cps-nutshell.service");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc/systemd/system/cps-nutshell.service", &link)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_configures_the_driver_of_the_embed_kind() {
        let c = Nutshell {
            embed: Layout::Container,
            inner_key: "k".into(),
            service: "helloworld".into(),
        };
        let s = c.start_script();
        assert!(s.contains("CLOUD = nspawn"));
        assert!(s.contains("NSPAWN_ROOTFS = /var/lib/cps/nutshell/rootfs"));
        assert!(s.contains("TYPE = helloworld"));
        assert!(!s.contains("PRIVATE KEY"));
        assert_eq!(c.packages(), ["systemd-container"]);
        let v = Nutshell {
            embed: Layout::Disk,
            ..c
        };
        let s = v.start_script();
        assert!(s.contains("CLOUD = qemu"));
        assert!(s.contains("IMAGE = /var/lib/cps/nutshell/agent.img"));
        assert_ne!(
            crate::cache::chain_key(None, "nutshell", &v.inputs()),
            crate::cache::chain_key(
                None,
                "nutshell",
                &Nutshell {
                    inner_key: "other".into(),
                    ..v
                }
                .inputs()
            )
        );
    }
}
