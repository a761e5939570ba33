//! Stage `cloud`: what differs per target cloud — network configuration and the
//! consoles the cloud shows to its users.

use super::{Ctx, StageOps, StageResult};
use crate::recipe::Cloud as CloudKind;
use serde_json::json;

pub struct Cloud {
    pub cloud: CloudKind,
}

impl Cloud {
    /// systemd-networkd units: (file name, contents).
    fn network_units(&self) -> Vec<(&'static str, String)> {
        let dhcp = |name: &str| {
            format!("[Match]\nName={name}\n\n[Network]\nDHCP=yes\n\n[DHCPv4]\nUseHostname=no\n")
        };
        match self.cloud {
            // VirtualBox appliances come with two NICs (NAT + host-only): DHCP on both.
            CloudKind::Vbox => vec![
                ("10-first.network", dhcp("en* eth0")),
                ("20-second.network", dhcp("eth1")),
            ],
            _ => vec![("10-dhcp.network", dhcp("en* eth*"))],
        }
    }
}

impl StageOps for Cloud {
    fn name(&self) -> String {
        "cloud".into()
    }

    fn describe(&self) -> String {
        format!(
            "{:?} network configuration (systemd-networkd, DHCP)",
            self.cloud
        )
        .to_lowercase()
    }

    /// A cache layer: its inputs define the tree it leaves.
    fn cacheable(&self) -> bool {
        true
    }

    fn inputs(&self) -> serde_json::Value {
        json!({ "cloud": self.cloud, "units": self.network_units() })
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        for (name, body) in self.network_units() {
            ctx.write_file(&format!("etc/systemd/network/{name}"), &body)?;
        }
        // Enabling by symlink, as `systemctl enable` would: no chroot needed.
        let wants = ctx.root_path("etc/systemd/system/multi-user.target.wants");
        std::fs::create_dir_all(&wants)?;
        let link = wants.join("systemd-networkd.service");
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink("/lib/systemd/system/systemd-networkd.service", &link)?;
        }
        super::fail_point("cloud")?;
        Ok(())
    }
}
