//! Stage `system`: base system configuration — hostname, hosts, locale, an empty
//! machine id (so every instance gets its own at first boot), and the readiness
//! marker unit the boot test waits for.

use super::{Ctx, StageOps, StageResult};
use crate::host::ChrootSession;
use serde_json::json;

/// The line the readiness unit prints on the serial console once the system is up,
/// followed by `uptime=SECONDS root_mib=SIZE` (the root filesystem's size, which tells a
/// test that the disk was grown at boot).
pub const READY_MARKER: &str = "mkimage-ready";

const READY_UNIT: &str = "[Unit]
Description=Tell the console (and mkimage boot-test) that boot finished
After=multi-user.target network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'r=\"mkimage-ready uptime=$(cut -d\" \" -f1 /proc/uptime) root_mib=$(df -m --output=size / | tail -n 1 | tr -d \" \")\"; for t in /dev/ttyS0 /dev/hvc0; do [ -c $t ] && echo \"$r\" > $t 2>/dev/null; done; true'

[Install]
WantedBy=multi-user.target
";

pub struct System {
    pub hostname: String,
    pub locale: String,
}

impl StageOps for System {
    fn name(&self) -> String {
        "system".into()
    }

    fn describe(&self) -> String {
        format!(
            "hostname {}, locale {}, readiness unit",
            self.hostname, self.locale
        )
    }

    /// A cache layer: its inputs define the tree it leaves.
    fn cacheable(&self) -> bool {
        true
    }

    fn inputs(&self) -> serde_json::Value {
        json!({
            "hostname": self.hostname,
            "locale": self.locale,
            // A digest keeps `plan` readable; any change to the unit still changes the key.
            "ready_unit_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(READY_UNIT)),
        })
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        ctx.write_file("etc/hostname", &format!("{}\n", self.hostname))?;
        ctx.write_file(
            "etc/hosts",
            &format!(
                "127.0.0.1\tlocalhost\n127.0.1.1\t{h}\n\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
                h = self.hostname
            ),
        )?;
        // Empty, not absent: systemd then treats the first boot as first boot and
        // generates a fresh id, so clones of the image never share one.
        ctx.write_file("etc/machine-id", "")?;
        let _ = std::fs::remove_file(ctx.root_path("var/lib/dbus/machine-id"));

        ctx.write_file("etc/locale.gen", &format!("{} UTF-8\n", self.locale))?;
        ctx.write_file("etc/default/locale", &format!("LANG={}\n", self.locale))?;
        ctx.write_file("etc/systemd/system/mkimage-ready.service", READY_UNIT)?;

        let chroot = ChrootSession::enter(&ctx.rootfs)?;
        super::fail_point("system")?;
        chroot.cmd("locale-gen").run()?;
        chroot
            .cmd("systemctl")
            .args(["enable", "mkimage-ready.service"])
            .run()?;
        chroot.exit()?;
        Ok(())
    }
}
