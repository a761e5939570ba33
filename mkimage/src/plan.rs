//! The planner: the ONE place that decides which stages a recipe needs and in
//! which order, and what each stage's cache key is.

use crate::cache::{chain_key, Cache};
use crate::recipe::{Layout, Recipe};
use crate::stage::{self, Stage};

/// Which image of the build a stage works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The image the build writes.
    Image,
    /// The services image a Nutshell embeds, built first in the same run.
    Embedded,
}

/// A stage with its place in the chain of cache keys.
pub struct Planned {
    pub stage: Stage,
    pub key: String,
    /// True when the cache holds this stage's result (only for cacheable stages).
    pub cached: bool,
    pub scope: Scope,
}

impl Planned {
    /// The stage's name, `embedded/`-prefixed inside a Nutshell's embedded image.
    pub fn display_name(&self) -> String {
        match self.scope {
            Scope::Image => self.stage.ops().name(),
            Scope::Embedded => format!("embedded/{}", self.stage.ops().name()),
        }
    }
}

/// The services image a Nutshell embeds: the recipe's services, dist and cloud
/// settings, laid out as a container tree or a VM disk.
pub fn embedded_recipe(recipe: &Recipe) -> Option<Recipe> {
    if recipe.layout != Layout::Nutshell {
        return None;
    }
    let n = recipe
        .nutshell
        .clone()
        .unwrap_or_else(crate::recipe::default_nutshell);
    let mut r = recipe.clone();
    r.layout = if n.embed == Layout::Container {
        Layout::Container
    } else {
        Layout::Disk
    };
    r.nutshell = None;
    r.formats = vec![crate::recipe::OutputFormat::Raw];
    if r.layout == Layout::Disk {
        // Nested agents boot with a per-node config drive, as on OpenStack/KVM.
        r.cloud = crate::recipe::Cloud::Openstack;
        r.hypervisor = crate::recipe::Hypervisor::Kvm;
        r.kernel = None;
    }
    Some(r)
}

/// The Nutshell itself: a bootable disk with the runtime (as manager), named and
/// sized by the `[nutshell]` settings. It runs no service of its own: the agents
/// run inside it, from the embedded image.
pub fn nutshell_recipe(recipe: &Recipe) -> Recipe {
    let n = recipe
        .nutshell
        .clone()
        .unwrap_or_else(crate::recipe::default_nutshell);
    let mut r = recipe.clone();
    r.layout = Layout::Disk;
    r.services = vec![];
    r.hostname = n.hostname;
    r.filename = n.filename;
    r.size_mib = n.size_mib;
    // Pruning would remove what the nutshell stage adds (nspawn, qemu).
    r.optimize = false;
    r
}

/// Every stage of a build with its scope: for a Nutshell, the embedded image's
/// stages first, then the Nutshell's with the `nutshell` stage after `core`.
pub fn scoped_stages(recipe: &Recipe) -> Result<Vec<(Scope, Stage)>, crate::service::ServiceError> {
    let Some(inner) = embedded_recipe(recipe) else {
        return Ok(stages(recipe)?
            .into_iter()
            .map(|s| (Scope::Image, s))
            .collect());
    };
    let mut out: Vec<(Scope, Stage)> = stages(&inner)?
        .into_iter()
        .map(|s| (Scope::Embedded, s))
        .collect();
    let outer = nutshell_recipe(recipe);
    for s in stages(&outer)? {
        let after_core = matches!(s, Stage::Core(_));
        out.push((Scope::Image, s));
        if after_core {
            out.push((
                Scope::Image,
                Stage::Nutshell(stage::nutshell::Nutshell {
                    embed: inner.layout,
                    inner_key: String::new(),
                    service: recipe
                        .services
                        .first()
                        .cloned()
                        .unwrap_or_else(|| "helloworld".into()),
                }),
            ));
        }
    }
    Ok(out)
}

/// Packages of the base tree: minbase plus what every image needs plus the recipe's.
pub fn base_packages(recipe: &Recipe) -> Vec<String> {
    let mut p: Vec<String> = stage::debootstrap::BASE_PACKAGES
        .iter()
        .map(|s| s.to_string())
        .collect();
    p.extend(recipe.packages.iter().cloned());
    p.sort();
    p.dedup();
    p
}

/// What the `debootstrap` stage installs: the base set plus the packages of the
/// stages every image of this layout has (the kernel's, the runtime's, the
/// bootloader's). One apt transaction for all of them is much faster than one per
/// stage (one dependency solve, one download, one dpkg run), and those packages
/// change with the tool, not with the recipe's services, so a service change still
/// reuses the base layer.
pub fn hoisted_packages(recipe: &Recipe, kernel: Option<&str>) -> Vec<String> {
    let mut p = base_packages(recipe);
    p.extend(stage::core::PACKAGES.iter().map(|s| s.to_string()));
    if let Some(k) = kernel {
        p.push(k.to_owned());
        p.push("initramfs-tools".into());
        p.extend(stage::bootloader::PACKAGES.iter().map(|s| s.to_string()));
    }
    p.sort();
    p.dedup();
    p
}

/// Packages pruning keeps (with their dependency closure): the base set, the
/// runtime's, the kernel, and every enabled service's packages and keep-list.
pub fn prune_roots(recipe: &Recipe) -> Vec<String> {
    let kernel = crate::recipe::kernel_package(recipe);
    let bootable = recipe.layout != Layout::Container;
    let mut r = hoisted_packages(recipe, bootable.then_some(kernel.as_str()));
    for name in &recipe.services {
        if let Ok((s, _)) = crate::service::load(name) {
            r.extend(s.packages);
            r.extend(s.keep);
        }
    }
    r.sort();
    r.dedup();
    r
}

/// The ordered stages for a recipe. Fails only when a service has no valid recipe.
pub fn stages(recipe: &Recipe) -> Result<Vec<Stage>, crate::service::ServiceError> {
    let bootable = recipe.layout != Layout::Container;
    let kernel_package = recipe
        .kernel
        .clone()
        .unwrap_or_else(|| crate::recipe::default_kernel_package(recipe));
    let mut s = vec![
        Stage::Debootstrap(stage::debootstrap::Debootstrap {
            dist: recipe.dist.clone(),
            arch: recipe.arch.debian().to_string(),
            mirror: recipe.mirror.clone(),
            variant: "minbase".into(),
            packages: hoisted_packages(recipe, bootable.then_some(kernel_package.as_str())),
            defer_initramfs: bootable,
        }),
        Stage::System(stage::system::System {
            hostname: recipe.hostname.clone(),
            locale: "en_US.UTF-8".into(),
        }),
    ];
    if bootable {
        s.push(Stage::Kernel(stage::kernel::Kernel {
            package: kernel_package,
        }));
    }
    s.push(Stage::Core(stage::core::Core {
        cps_binary: stage::core::find_cps_binary().unwrap_or_else(|| "cps".into()),
        config_dir: stage::core::find_config_dir(),
        container: !bootable,
    }));
    for name in &recipe.services {
        let (recipe, text) = crate::service::load(name)?;
        s.push(Stage::Service(stage::service::Service { recipe, text }));
    }
    if recipe.optimize {
        s.push(Stage::Optimize(stage::optimize::Optimize {
            roots: prune_roots(recipe),
        }));
    }
    s.push(Stage::Cloud(stage::cloud::Cloud {
        cloud: recipe.cloud,
    }));
    s.push(Stage::Finalize(stage::finalize::Finalize));
    if bootable {
        s.push(Stage::Bootloader(stage::bootloader::Bootloader {
            cloud: recipe.cloud,
            hypervisor: recipe.hypervisor,
            dist: recipe.dist.clone(),
        }));
        if recipe.optimize {
            s.push(Stage::Resize(stage::resize::Resize {
                headroom_mib: stage::resize::DEFAULT_HEADROOM_MIB,
                max_mib: recipe.size_mib,
            }));
        }
        s.push(Stage::Assemble(stage::assemble::Assemble {
            size_mib: recipe.size_mib,
        }));
    }
    Ok(s)
}

/// Stages with chained keys and cache state.
pub fn plan(recipe: &Recipe, cache: &Cache) -> Result<Vec<Planned>, PlanError> {
    plan_with(recipe, cache, None)
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Service(#[from] crate::service::ServiceError),
    #[error("--rebuild-from {0}: this recipe has no such stage (its stages: {1})")]
    NoSuchStage(String, String),
}

/// Like [`plan`], ignoring cache hits from stage `rebuild_from` on.
pub fn plan_with(
    recipe: &Recipe,
    cache: &Cache,
    rebuild_from: Option<&str>,
) -> Result<Vec<Planned>, PlanError> {
    let all = scoped_stages(recipe)?;
    let names: Vec<String> = all.iter().map(|(_, s)| s.ops().name()).collect();
    let rebuild_at = match rebuild_from {
        None => names.len(),
        Some(r) => names
            .iter()
            .position(|n| n == r)
            .ok_or_else(|| PlanError::NoSuchStage(r.to_owned(), names.join(", ")))?,
    };
    // One chain of keys per image; the nutshell stage takes the embedded image's
    // last key as an input.
    let mut parent_image: Option<String> = None;
    let mut parent_embedded: Option<String> = None;
    Ok(all
        .into_iter()
        .enumerate()
        .map(|(i, (scope, mut stage))| {
            if let Stage::Nutshell(n) = &mut stage {
                n.inner_key = parent_embedded.clone().unwrap_or_default();
            }
            let parent = match scope {
                Scope::Image => &mut parent_image,
                Scope::Embedded => &mut parent_embedded,
            };
            let ops = stage.ops();
            let key = chain_key(parent.as_deref(), &ops.name(), &ops.inputs());
            let cached = i < rebuild_at && ops.cacheable() && cache.contains(&ops.name(), &key);
            *parent = Some(key.clone());
            Planned {
                stage,
                key,
                cached,
                scope,
            }
        })
        .collect())
}

/// Human-readable plan, as `mkimage plan` prints it.
pub fn render(recipe: &Recipe, planned: &[Planned], cache: &Cache) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Plan for {} ({:?} layout, {} {}, cloud {:?}, hypervisor {:?}, {} MiB)\n",
        if recipe.layout == Layout::Nutshell {
            nutshell_recipe(recipe).filename
        } else {
            recipe.filename.clone()
        },
        recipe.layout,
        recipe.dist,
        recipe.arch.debian(),
        recipe.cloud,
        recipe.hypervisor,
        if recipe.layout == Layout::Nutshell {
            nutshell_recipe(recipe).size_mib
        } else {
            recipe.size_mib
        }
    ));
    if !recipe.services.is_empty() {
        out.push_str(&format!("services: {}\n", recipe.services.join(", ")));
    }
    for w in &recipe.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out.push_str(&format!("cache: {}\n\n", cache.dir().display()));
    let mut scope = Scope::Image;
    for (i, p) in planned.iter().enumerate() {
        let ops = p.stage.ops();
        if p.scope != scope {
            scope = p.scope;
            if let (Scope::Embedded, Some(inner)) = (scope, embedded_recipe(recipe)) {
                out.push_str(&format!(
                    "embedded {} image {} (built first, nested in the Nutshell):\n",
                    if inner.layout == Layout::Container {
                        "container"
                    } else {
                        "VM"
                    },
                    inner.filename
                ));
            } else {
                let n = nutshell_recipe(recipe);
                out.push_str(&format!(
                    "the Nutshell {} ({} MiB, hostname {}):\n",
                    n.filename, n.size_mib, n.hostname
                ));
            }
        }
        let indent = if p.scope == Scope::Embedded {
            "    "
        } else {
            ""
        };
        let state = if !ops.cacheable() {
            "run"
        } else if p.cached {
            "cache hit"
        } else {
            "cache miss"
        };
        out.push_str(&format!(
            "{indent}{:>2}. {:<12} [{:<10}] key {}\n{indent}      {}\n{indent}      inputs {}\n",
            i + 1,
            ops.name(),
            state,
            &p.key[..16],
            ops.describe(),
            ops.inputs()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::*;

    pub fn recipe() -> Recipe {
        Recipe {
            source: RecipeSource::Defaults,
            dist: "bookworm".into(),
            arch: Arch::Amd64,
            mirror: "http://mirror.example/debian".into(),
            cloud: Cloud::Openstack,
            hypervisor: Hypervisor::Kvm,
            layout: Layout::Disk,
            size_mib: 2048,
            optimize: false,
            services: vec![],
            hostname: "conpaas".into(),
            packages: vec![],
            kernel: None,
            filename: "conpaas.img".into(),
            formats: vec![OutputFormat::Raw],
            nutshell: None,
            warnings: vec![],
        }
    }

    fn names(r: &Recipe) -> Vec<String> {
        stages(r).unwrap().iter().map(|s| s.ops().name()).collect()
    }

    #[test]
    fn disk_layout_order() {
        assert_eq!(
            names(&recipe()),
            [
                "debootstrap",
                "system",
                "kernel",
                "core",
                "cloud",
                "finalize",
                "bootloader",
                "assemble"
            ]
        );
    }

    #[test]
    fn services_run_in_recipe_order_after_core() {
        let mut r = recipe();
        r.services = vec!["mysql".into(), "helloworld".into()];
        let n = names(&r);
        assert_eq!(&n[3..6], ["core", "service-mysql", "service-helloworld"]);
        r.services = vec!["nosuch".into()];
        assert!(stages(&r).is_err());
    }

    #[test]
    fn optimize_prunes_after_services_and_resizes_before_assembly() {
        let mut r = recipe();
        r.optimize = true;
        r.services = vec!["helloworld".into()];
        assert_eq!(
            names(&r),
            [
                "debootstrap",
                "system",
                "kernel",
                "core",
                "service-helloworld",
                "optimize",
                "cloud",
                "finalize",
                "bootloader",
                "resize",
                "assemble"
            ]
        );
        let roots = prune_roots(&r);
        assert!(roots.contains(&"openssh-server".to_string()));
        assert!(roots.contains(&"linux-image-cloud-amd64".to_string()));
    }

    #[test]
    fn container_layout_has_no_kernel_or_bootloader() {
        let mut r = recipe();
        r.layout = Layout::Container;
        assert_eq!(
            names(&r),
            ["debootstrap", "system", "core", "cloud", "finalize"]
        );
    }

    #[test]
    fn keys_chain_so_a_change_invalidates_only_later_stages() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::new(d.path());
        let a = plan(&recipe(), &cache).unwrap();
        let mut r = recipe();
        // EC2 and OpenStack share the cloud kernel: only later stages differ.
        r.cloud = Cloud::Ec2;
        let b = plan(&r, &cache).unwrap();
        for i in 0..4 {
            assert_eq!(a[i].key, b[i].key, "stage {i}");
        }
        for i in 4..a.len() {
            assert_ne!(a[i].key, b[i].key, "stage {i}");
        }
        let mut r = recipe();
        r.mirror = "http://other.example/debian".into();
        assert_ne!(plan(&r, &cache).unwrap()[0].key, a[0].key);
    }
}
