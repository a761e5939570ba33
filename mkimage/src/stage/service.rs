//! Stage `service:<name>`: one ConPaaS service's recipe applied inside the image.

use super::{Ctx, StageOps, StageResult};
use crate::host::{ChrootSession, Cmd};
use crate::service::ServiceRecipe;
use serde_json::json;

pub struct Service {
    pub recipe: ServiceRecipe,
    /// The recipe file's text, so any edit changes the cache key.
    pub text: String,
}

impl StageOps for Service {
    fn name(&self) -> String {
        format!("service-{}", self.recipe.name)
    }

    fn describe(&self) -> String {
        let mut d = format!(
            "{}: {} package(s)",
            self.recipe.description,
            self.recipe.packages.len()
        );
        if !self.recipe.repositories.is_empty() {
            let names: Vec<&str> = self
                .recipe
                .repositories
                .iter()
                .map(|r| r.uri.as_str())
                .collect();
            d.push_str(&format!(" from {}", names.join(", ")));
        }
        d
    }

    /// A cache layer: its inputs define the tree it leaves.
    fn cacheable(&self) -> bool {
        true
    }

    fn inputs(&self) -> serde_json::Value {
        use sha2::Digest;
        json!({
            "service": self.recipe.name,
            "recipe_sha256": hex::encode(sha2::Sha256::digest(self.text.as_bytes())),
        })
    }

    fn run(&self, ctx: &mut Ctx) -> StageResult {
        let r = &self.recipe;
        // Repository keys are fetched on the host (the image may have no curl yet).
        let mut added = Vec::new();
        for repo in &r.repositories {
            let key_rel = format!("usr/share/keyrings/mkimage-{}-{}.asc", r.name, repo.name);
            let key_path = ctx.root_path(&key_rel);
            std::fs::create_dir_all(key_path.parent().unwrap())?;
            Cmd::new("curl")
                .args(["-fsSL", "--max-time", "60", "-o"])
                .arg(&key_path)
                .arg(&repo.key_url)
                .run()?;
            let list = format!(
                "etc/apt/sources.list.d/mkimage-{}-{}.sources",
                r.name, repo.name
            );
            ctx.write_file(
                &list,
                &crate::service::sources_entry(repo, &format!("/{key_rel}")),
            )?;
            if !repo.keep {
                added.push(list);
            }
        }
        let chroot = ChrootSession::enter(&ctx.rootfs)?;
        super::fail_point(&self.name())?;
        let missing = crate::build::missing_packages(&ctx.rootfs, &r.packages);
        if !missing.is_empty() {
            chroot.cmd("apt-get").args(["-q", "update"]).run()?;
            chroot.apt_install(&missing)?;
        }
        for f in &r.files {
            ctx.write_file(&f.path, &f.content)?;
            let mode = u32::from_str_radix(f.mode.trim_start_matches("0o"), 8).map_err(|_| {
                anyhow::anyhow!("recipe {}: bad mode `{}` for {}", r.name, f.mode, f.path)
            })?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                ctx.root_path(&f.path),
                std::fs::Permissions::from_mode(mode),
            )?;
        }
        for c in &r.commands {
            chroot.cmd("sh").args(["-e", "-c", c]).run()?;
        }
        for u in &r.disable {
            chroot
                .cmd("systemctl")
                .args(["disable", "--quiet", u])
                .run()?;
        }
        for u in &r.enable {
            chroot
                .cmd("systemctl")
                .args(["enable", "--quiet", u])
                .run()?;
        }
        chroot.exit()?;
        // Temporary repositories go away again (their keys too): the image keeps only
        // what it needs to be updated from Debian.
        for list in added {
            let _ = std::fs::remove_file(ctx.root_path(&list));
        }
        for repo in r.repositories.iter().filter(|x| !x.keep) {
            let _ = std::fs::remove_file(ctx.root_path(&format!(
                "usr/share/keyrings/mkimage-{}-{}.asc",
                r.name, repo.name
            )));
        }
        Ok(())
    }
}
