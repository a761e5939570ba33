//! Stage `optimize`: prunes what no enabled service needs.
//!
//! - Packages: every installed package is marked automatically installed, the
//!   roots (required-priority packages, the base set, the runtime's, each service's
//!   packages and keep-list, the kernel) are marked manual, and apt's autoremove
//!   purges the rest. apt keeps the dependency closure of the roots and never
//!   removes an Essential package, which is the rule the original implemented by
//!   hand with apt-rdepends.
//! - Documentation, manual pages and locales other than en_US: deleted now, and
//!   excluded for later installs through a dpkg path-exclude file (copyright
//!   files stay: the licences require them).

use super::{Ctx, StageOps, StageResult};
use crate::host::ChrootSession;
use serde_json::json;

const DPKG_EXCLUDES: &str =
    "# written by mkimage (optimize = true): no docs, manuals or foreign locales
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-include=/usr/share/locale/en_US/*
path-include=/usr/share/locale/en/*
";

pub struct Optimize {
    /// Packages that must stay, with their dependency closure.
    pub roots: Vec<String>,
}

impl StageOps for Optimize {
    fn name(&self) -> String {
        "optimize".into()
    }

    fn describe(&self) -> String {
        format!(
            "prune packages outside the closure of {} roots; drop docs, manuals, locales",
            self.roots.len()
        )
    }

    /// A cache layer: its inputs define the tree it leaves.
    fn cacheable(&self) -> bool {
        true
    }

    fn inputs(&self) -> serde_json::Value {
        json!({ "roots": self.roots, "excludes": DPKG_EXCLUDES })
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        ctx.write_file("etc/dpkg/dpkg.cfg.d/mkimage-excludes", DPKG_EXCLUDES)?;
        let chroot = ChrootSession::enter(&ctx.rootfs)?;
        super::fail_point("optimize")?;
        let listing = chroot
            .cmd("dpkg-query")
            .args(["-W", "-f", "${Package} ${Priority}\n"])
            .output()?;
        let installed: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.split(' ').next())
            .collect();
        let mut roots: Vec<String> = listing
            .lines()
            .filter(|l| l.ends_with(" required"))
            .filter_map(|l| l.split(' ').next().map(str::to_owned))
            .collect();
        roots.extend(
            self.roots
                .iter()
                .filter(|r| installed.contains(&r.as_str()))
                .cloned(),
        );
        roots.sort();
        roots.dedup();
        chroot
            .cmd("apt-mark")
            .arg("auto")
            .args(&installed)
            .output()?;
        chroot.cmd("apt-mark").arg("manual").args(&roots).output()?;
        chroot
            .cmd("apt-get")
            .args([
                "-y",
                "-q",
                "-o",
                "APT::AutoRemove::RecommendsImportant=false",
                "-o",
                "APT::AutoRemove::SuggestsImportant=false",
                "autoremove",
                "--purge",
            ])
            .run()?;
        chroot.cmd("apt-get").arg("clean").run()?;
        chroot.exit()?;
        prune_docs(ctx)?;
        Ok(())
    }
}

fn prune_docs(ctx: &Ctx) -> anyhow::Result<()> {
    use crate::host::fsutil::remove_tree;
    // Docs: keep only copyright files.
    if let Ok(rd) = std::fs::read_dir(ctx.root_path("usr/share/doc")) {
        for pkg in rd.flatten() {
            let p = pkg.path();
            if p.is_symlink() || !p.is_dir() {
                continue;
            }
            for e in std::fs::read_dir(&p)?.flatten() {
                if e.file_name() == "copyright" {
                    continue;
                }
                let ep = e.path();
                if ep.is_dir() && !ep.is_symlink() {
                    remove_tree(&ep)?;
                } else {
                    std::fs::remove_file(&ep)?;
                }
            }
        }
    }
    for dir in [
        "usr/share/man",
        "usr/share/info",
        "usr/share/lintian",
        "usr/share/doc-base",
    ] {
        let d = ctx.root_path(dir);
        if d.is_dir() {
            remove_tree(&d)?;
            std::fs::create_dir_all(&d)?;
        }
    }
    if let Ok(rd) = std::fs::read_dir(ctx.root_path("usr/share/locale")) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n == "locale.alias" || n == "en" || n.starts_with("en_US") {
                continue;
            }
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                remove_tree(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
    }
    Ok(())
}
