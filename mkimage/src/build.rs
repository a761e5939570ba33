//! The build driver: runs the planned stages inside guards, then writes the
//! output atomically with its manifest and checksums.

use crate::cache::Cache;
use crate::host::fsutil::{self, PendingFile};
use crate::host::signals;
use crate::manifest::{Artefact, Manifest, StageRecord};
use crate::plan::{self, Planned, Scope};
use crate::recipe::{Cloud, Layout, OutputFormat, Recipe};
use crate::stage::Ctx;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct BuildOptions {
    pub output_dir: PathBuf,
    /// Holds work directories of running builds.
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Show progress spinners (off when stderr is not a terminal or in tests).
    pub progress: bool,
    /// Ignore cache hits from this stage on (e.g. `optimize`, `service-php`).
    pub rebuild_from: Option<String>,
}

impl BuildOptions {
    pub fn with_output(output_dir: &Path) -> BuildOptions {
        BuildOptions {
            output_dir: output_dir.to_owned(),
            state_dir: default_state_dir(),
            cache_dir: default_cache_dir(),
            progress: false,
            rebuild_from: None,
        }
    }
}

pub fn default_state_dir() -> PathBuf {
    std::env::var_os("MKIMAGE_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/mkimage".into())
}

pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("MKIMAGE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/mkimage".into())
}

#[derive(Debug)]
pub struct BuildReport {
    pub image: PathBuf,
    pub manifest: PathBuf,
    pub log: PathBuf,
    pub seconds: f64,
    pub stages: Vec<StageRecord>,
    pub size: u64,
    pub allocated: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("preflight: {0}")]
    Preflight(#[from] crate::preflight::PreflightError),
    #[error("stage `{stage}` failed: {source:#}\n  full log: {}", log.display())]
    Stage {
        stage: String,
        source: anyhow::Error,
        log: PathBuf,
    },
    #[error("build interrupted by signal {signal}; everything it had mounted, attached or half-written was released\n  full log: {}", log.display())]
    Interrupted { signal: i32, log: PathBuf },
    #[error("{context}: {source:#}")]
    Io {
        context: String,
        source: anyhow::Error,
    },
}

impl BuildError {
    fn io(context: impl Into<String>, source: impl Into<anyhow::Error>) -> BuildError {
        BuildError::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// A private work directory, journaled before it is created and removed (never
/// through a mount) on drop.
pub struct WorkDir {
    path: PathBuf,
    ticket: Option<crate::journal::Ticket>,
}

impl WorkDir {
    pub fn create(path: &Path) -> std::io::Result<WorkDir> {
        let ticket = crate::journal::acquire(crate::journal::Resource::Dir {
            path: fsutil::absolute(path),
        });
        let w = WorkDir {
            path: path.to_owned(),
            ticket,
        };
        std::fs::create_dir_all(path)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        match fsutil::remove_tree(&self.path) {
            Ok(()) => crate::journal::release(self.ticket.take()),
            Err(e) => tracing::error!(
                "could not remove the work directory {}: {e}",
                self.path.display()
            ),
        }
    }
}

/// Warns about builds that died holding host resources (what `mkimage gc` releases).
pub fn warn_stale_journals(state_dir: &Path) {
    for j in crate::journal::stale(state_dir) {
        tracing::warn!(
            "an earlier `{}` (pid {}, started {}) died holding {} resource(s) on this host; run `mkimage gc` to release them",
            j.command,
            j.pid,
            j.started,
            j.outstanding.len()
        );
    }
}

pub fn build(recipe: &Recipe, opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    signals::install();
    let started = Instant::now();
    warn_stale_journals(&opts.state_dir);
    for w in &recipe.warnings {
        tracing::warn!("{w}");
    }
    crate::preflight::check(recipe)?;
    let cache = Cache::new(&opts.cache_dir);
    let planned = plan::plan_with(recipe, &cache, opts.rebuild_from.as_deref())
        .map_err(|e| crate::preflight::PreflightError(e.to_string()))?;
    crate::preflight::check_repositories(&planned)?;
    let build_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    // A Nutshell is written under its own name; other layouts under the recipe's.
    let out_name = if recipe.layout == Layout::Nutshell {
        plan::nutshell_recipe(recipe).filename
    } else {
        recipe.filename.clone()
    };
    let _journal =
        crate::journal::begin(&opts.state_dir, &build_id, "mkimage build").map_err(|e| {
            BuildError::io(
                format!(
                    "cannot write the crash journal under {}",
                    opts.state_dir.display()
                ),
                e,
            )
        })?;

    std::fs::create_dir_all(&opts.output_dir)
        .map_err(|e| BuildError::io(format!("cannot create {}", opts.output_dir.display()), e))?;
    let log_path = opts.output_dir.join(format!("{out_name}.build.log"));
    crate::logging::open_build_log(&log_path)
        .map_err(|e| BuildError::io(format!("cannot write {}", log_path.display()), e))?;
    tracing::info!(
        "build {build_id}: {} ({} stages), log {}",
        out_name,
        planned.len(),
        log_path.display()
    );

    let work = opts.state_dir.join("work").join(&build_id);
    let work_guard = WorkDir::create(&work)
        .map_err(|e| BuildError::io(format!("cannot create {}", work.display()), e))?;

    let image_path = opts.output_dir.join(&out_name);
    let pending = PendingFile::new(&image_path);
    let mut ctx = Ctx {
        recipe,
        work: work.clone(),
        rootfs: work.join("rootfs"),
        fs_uuid: uuid::Uuid::new_v4().to_string(),
        disk: Some(pending.path().to_owned()),
        kernel_version: None,
        disk_size_mib: None,
        embedded: None,
    };

    // A Nutshell's embedded image is built first, in its own tree and disk file.
    let embedded_recipe = plan::embedded_recipe(recipe);
    let mut embedded_ctx = match &embedded_recipe {
        Some(r) => {
            let dir = work.join("embedded");
            std::fs::create_dir_all(&dir)
                .map_err(|e| BuildError::io(format!("cannot create {}", dir.display()), e))?;
            Some(Ctx {
                recipe: r,
                work: dir.clone(),
                rootfs: dir.join("rootfs"),
                fs_uuid: uuid::Uuid::new_v4().to_string(),
                disk: Some(dir.join(&r.filename)),
                kernel_version: None,
                disk_size_mib: None,
                embedded: None,
            })
        }
        None => None,
    };
    if let Some(e) = &embedded_ctx {
        ctx.embedded = if e.recipe.layout == Layout::Container {
            Some(e.rootfs.clone())
        } else {
            e.disk.clone()
        };
    }
    // Declared after `work_guard`, so on an early return `layers` is dropped (the
    // overlays unmounted) before the work directory is removed.
    let (stages, layers) = run_stages(
        &planned,
        &mut ctx,
        embedded_ctx.as_mut(),
        &cache,
        opts,
        &log_path,
    )?;
    drop(embedded_ctx);

    // Container layout: the root filesystem on the whole file, no partition table.
    if recipe.layout == Layout::Container {
        write_container_fs(&ctx, recipe.size_mib).map_err(|source| BuildError::Stage {
            stage: "assemble".into(),
            source,
            log: log_path.clone(),
        })?;
    }
    let packages = installed_packages(&ctx.rootfs);
    let stage_err = |stage: &str, source: anyhow::Error| {
        if signals::interrupted() {
            BuildError::Interrupted {
                signal: signals::signal().unwrap_or(2),
                log: log_path.clone(),
            }
        } else {
            BuildError::Stage {
                stage: stage.into(),
                source,
                log: log_path.clone(),
            }
        }
    };
    crate::stage::fail_point("output").map_err(|e| stage_err("output", e))?;

    // Every other format is converted from the finished raw image before anything is
    // renamed into place, so all artefacts appear together or none does.
    let formats = output_formats(recipe);
    let raw_format = if recipe.layout == Layout::Container {
        "ext4"
    } else {
        "raw"
    };
    let mut outputs: Vec<(PendingFile, &'static str)> = Vec::new();
    for f in &formats {
        let (ext, fmt) = match f {
            OutputFormat::Raw => continue,
            OutputFormat::Qcow2 => ("qcow2", "qcow2"),
            OutputFormat::Vdi => ("vdi", "vdi"),
            OutputFormat::Vmdk => ("vmdk", "vmdk"),
            OutputFormat::Tar => ("tar.zst", "tar.zst"),
            OutputFormat::Ova => ("ova", "ova"),
        };
        let name = artefact_name(&out_name, ext);
        let out = PendingFile::new(&opts.output_dir.join(&name));
        if fmt == "ova" {
            // VirtualBox's setup of the original: a NAT adapter and a host-only one.
            let networks = match recipe.cloud {
                Cloud::Vbox => vec!["NAT", "HostOnly"],
                _ => vec!["NAT"],
            };
            let stem = name.strip_suffix(".ova").unwrap_or(&name);
            crate::ova::write(pending.path(), out.path(), stem, networks, &work)
        } else {
            convert(pending.path(), &ctx.rootfs, out.path(), fmt)
        }
        .map_err(|e| stage_err("output", e))?;
        outputs.push((out, fmt));
    }
    let mut all: Vec<(PendingFile, &'static str)> = Vec::new();
    if formats.contains(&OutputFormat::Raw) {
        all.push((pending, raw_format));
    }
    all.extend(outputs);
    let mut artefacts = Vec::new();
    for (p, fmt) in &all {
        // The image must reach the disk before it is renamed into place; writing it back
        // while it is hashed (it is read from the page cache) takes that off the wall time,
        // and the commit's own fsync then finds little left to do.
        let path = p.path().to_owned();
        let writeback = std::thread::spawn(move || fsutil::sync_file(&path));
        let d = crate::verify::digest_file(p.path(), |_| {});
        let synced = writeback
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("writeback thread panicked")));
        let d = d
            .and_then(|d| synced.map(|_| d))
            .map_err(|e| stage_err("output", e.into()))?;
        let (size, allocated) =
            fsutil::sizes(p.path()).map_err(|e| stage_err("output", e.into()))?;
        artefacts.push(Artefact {
            file: p
                .dest()
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            format: fmt.to_string(),
            size,
            allocated,
            md5: d.md5,
            sha256: d.sha256,
        });
    }
    let mut paths = Vec::new();
    for (p, _) in all {
        paths.push(p.commit().map_err(|e| stage_err("output", e.into()))?);
    }
    let manifest = Manifest {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        build_id: build_id.clone(),
        created: now_rfc3339(),
        recipe_digest: recipe_digest(recipe),
        recipe: serde_json::to_value(recipe).unwrap_or_default(),
        stages: stages.clone(),
        packages,
        artefacts: artefacts.clone(),
        registrations: vec![],
        preinstall: vec![],
    };
    for (path, a) in paths.iter().zip(&artefacts) {
        manifest
            .store(&Manifest::path_for(path))
            .map_err(|e| stage_err("output", e))?;
        crate::verify::update_sums_file(&opts.output_dir.join("MD5SUMS"), &a.file, &a.md5)
            .and_then(|_| {
                crate::verify::update_sums_file(
                    &opts.output_dir.join("SHA256SUMS"),
                    &a.file,
                    &a.sha256,
                )
            })
            .map_err(|e| stage_err("output", e.into()))?;
    }
    drop(layers);
    drop(work_guard);
    let seconds = started.elapsed().as_secs_f64();
    for a in &artefacts {
        tracing::info!(
            "wrote {}: {} MiB apparent, {} MiB allocated, md5 {}",
            a.file,
            a.size >> 20,
            a.allocated >> 20,
            a.md5
        );
    }
    tracing::info!("build {build_id} finished in {seconds:.1} s");
    let image = paths[0].clone();
    let (size, allocated) = (artefacts[0].size, artefacts[0].allocated);
    let manifest_path = Manifest::path_for(&image);
    crate::logging::close_build_log();
    Ok(BuildReport {
        image,
        manifest: manifest_path,
        log: log_path,
        seconds,
        stages,
        size,
        allocated,
    })
}

/// Whether a stage that ran for `seconds` is worth a cache layer. Storing a layer walks
/// the whole tree (about a second for a minimal image), and a later build restores the
/// layer before it anyway: a stage quicker than that is cheaper to run again than to
/// store. `MKIMAGE_CACHE_MIN_SECONDS` (default 2) sets the bar; 0 stores every layer.
fn worth_storing(seconds: f64) -> bool {
    let min = std::env::var("MKIMAGE_CACHE_MIN_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(2.0);
    seconds >= min
}

fn run_stages<'r>(
    planned: &[Planned],
    ctx: &mut Ctx<'r>,
    mut embedded: Option<&mut Ctx<'r>>,
    cache: &Cache,
    opts: &BuildOptions,
    log_path: &Path,
) -> Result<(Vec<StageRecord>, Vec<crate::cache::LayerMount>), BuildError> {
    let fail = |stage: &str, source: anyhow::Error| {
        if signals::interrupted() {
            BuildError::Interrupted {
                signal: signals::signal().unwrap_or(2),
                log: log_path.to_owned(),
            }
        } else {
            BuildError::Stage {
                stage: stage.into(),
                source,
                log: log_path.to_owned(),
            }
        }
    };
    // Check every stage before running any.
    for p in planned {
        let ops = p.stage.ops();
        let c: &Ctx = match (p.scope, embedded.as_deref()) {
            (Scope::Embedded, Some(e)) => e,
            _ => ctx,
        };
        ops.check(c).map_err(|e| fail(&p.display_name(), e))?;
    }
    // A later cached stage makes the earlier ones of the same image unnecessary:
    // each image starts from its last hit. The embedded image is not built at all
    // when the Nutshell's own layers hold it already.
    let start_of = |scope: Scope| {
        planned
            .iter()
            .enumerate()
            .filter(|(_, p)| p.scope == scope)
            .filter(|(_, p)| p.cached)
            .map(|(i, _)| i)
            .next_back()
            .unwrap_or(0)
    };
    let start_image = start_of(Scope::Image);
    let start_embedded = start_of(Scope::Embedded);
    let embedded_needed = planned.iter().enumerate().any(|(i, p)| {
        matches!(p.stage, crate::stage::Stage::Nutshell(_))
            && (i > start_image || (i == start_image && !p.cached))
    });
    let mut records = Vec::new();
    // The restored layers: mounted as the trees until the build ends.
    let mut layers = Vec::new();
    // Which of `layers` each tree is mounted from; `None` while it is a plain directory
    // (which a first layer is stored by moving into the cache).
    let mut layer_of: [Option<usize>; 2] = [None, None];
    let n = planned.len();
    // The last cache layer each tree matches: the next layer hard-links to it.
    let mut parent_layer: [Option<(String, String)>; 2] = [None, None];
    for (i, p) in planned.iter().enumerate() {
        let ops = p.stage.ops();
        let name = ops.name();
        let shown = p.display_name();
        let slot = (p.scope == Scope::Embedded) as usize;
        let start = match p.scope {
            Scope::Image => start_image,
            Scope::Embedded => start_embedded,
        };
        let skip_embedded = p.scope == Scope::Embedded && !embedded_needed;
        if i < start || skip_embedded {
            // Covered by a later cache entry; its fail point still counts, so a test can
            // inject a failure into every stage whatever the cache holds.
            crate::stage::fail_point(&name).map_err(|e| fail(&shown, e))?;
            if ops.cacheable() && cache.contains(&name, &p.key) {
                parent_layer[slot] = Some((name.clone(), p.key.clone()));
            }
            records.push(StageRecord {
                name: shown,
                key: p.key.clone(),
                cached: true,
                seconds: 0.0,
            });
            continue;
        }
        let c: &mut Ctx<'r> = match (p.scope, embedded.as_deref_mut()) {
            (Scope::Embedded, Some(e)) => e,
            _ => &mut *ctx,
        };
        let bar = crate::progress::spinner(
            opts.progress,
            format!("[{}/{n}] {shown}: {}", i + 1, ops.describe()),
        );
        let t = Instant::now();
        signals::check().map_err(|e| fail(&shown, e.into()))?;
        let result = if p.cached {
            tracing::info!("[{}/{n}] {shown}: cache hit {}", i + 1, &p.key[..16]);
            cache
                .mount_layer(&name, &p.key, &c.rootfs, &c.work.join("layer"))
                .map(|m| {
                    layers.push(m);
                    layer_of[slot] = Some(layers.len() - 1);
                })
                .and_then(|_| crate::stage::fail_point(&name))
        } else {
            tracing::info!("[{}/{n}] {shown}: {}", i + 1, ops.describe());
            let r = ops.run(c);
            ops.cleanup(c);
            r
        };
        if let Err(e) = result {
            bar.abandon_with_message(format!("[{}/{n}] {shown}: FAILED", i + 1));
            return Err(fail(&shown, e));
        }
        let ran = t.elapsed().as_secs_f64();
        if ops.cacheable() && !p.cached && !worth_storing(ran) {
            tracing::info!(
                "[{}/{n}] {shown}: not stored in the cache (ran {ran:.1} s; storing costs about as much)",
                i + 1
            );
        } else if ops.cacheable() && !p.cached {
            let parent = parent_layer[slot]
                .as_ref()
                .map(|(s, k)| (s.as_str(), k.as_str()));
            let adopted = if layer_of[slot].is_some() {
                Ok(None)
            } else {
                cache.adopt(&name, &p.key, &c.rootfs, &c.work.join("layer"))
            };
            match adopted {
                Ok(Some(m)) => {
                    layers.push(m);
                    layer_of[slot] = Some(layers.len() - 1);
                }
                Ok(None) => {
                    // On a mounted layer, the entry is made from its lower tree and the
                    // changes in its upper directory; otherwise by comparing the whole
                    // tree with the parent entry.
                    let overlay = layer_of[slot].and_then(|i| layers[i].overlay_dirs());
                    let fast = overlay
                        .map(|(lower, upper)| cache.store_overlay(&name, &p.key, lower, upper));
                    let stored = match fast {
                        Some(Ok(())) => Ok(()),
                        Some(Err(e)) => {
                            tracing::info!("{shown}: storing by comparison instead: {e:#}");
                            cache.store(&name, &p.key, &c.rootfs, parent)
                        }
                        None => cache.store(&name, &p.key, &c.rootfs, parent),
                    };
                    if let Err(e) = stored {
                        tracing::warn!("could not store stage {shown} in the cache: {e:#}");
                    }
                }
                // The tree may be in the cache already and not mounted back.
                Err(e) => return Err(fail(&shown, e)),
            }
            // A store aborted by a signal must not pass for success.
            signals::check().map_err(|e| fail(&shown, e.into()))?;
        }
        if ops.cacheable() && cache.contains(&name, &p.key) {
            parent_layer[slot] = Some((name.clone(), p.key.clone()));
        }
        let secs = t.elapsed().as_secs_f64();
        bar.finish_with_message(format!(
            "[{}/{n}] {shown}: done in {secs:.1} s{}",
            i + 1,
            if p.cached { " (cache hit)" } else { "" }
        ));
        records.push(StageRecord {
            name: shown,
            key: p.key.clone(),
            cached: p.cached,
            seconds: secs,
        });
    }
    Ok((records, layers))
}

/// The formats to write: the recipe's, with VirtualBox's VDI added for `cloud = vbox`.
pub fn output_formats(recipe: &Recipe) -> Vec<OutputFormat> {
    let mut f = recipe.formats.clone();
    if f.is_empty() {
        f.push(OutputFormat::Raw);
    }
    if recipe.cloud == Cloud::Vbox && !f.contains(&OutputFormat::Vdi) {
        f.push(OutputFormat::Vdi);
    }
    f
}

/// `conpaas.img` + `qcow2` -> `conpaas.qcow2`.
pub fn artefact_name(filename: &str, ext: &str) -> String {
    let stem = filename
        .strip_suffix(".img")
        .or_else(|| filename.rsplit_once('.').map(|(s, _)| s))
        .unwrap_or(filename);
    format!("{stem}.{ext}")
}

/// Writes one artefact from the raw image (or, for tar, from the tree).
fn convert(raw: &Path, tree: &Path, out: &Path, format: &str) -> anyhow::Result<()> {
    use crate::host::Cmd;
    match format {
        "tar.zst" => Cmd::new("tar")
            .args(["--zstd", "--numeric-owner", "--xattrs", "--acls", "-C"])
            .arg(tree)
            .arg("-cf")
            .arg(out)
            .arg(".")
            .run()?,
        "qcow2" => Cmd::new("qemu-img")
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(out)
            .run()?,
        "vmdk" => Cmd::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
            ])
            .arg(raw)
            .arg(out)
            .run()?,
        other => Cmd::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", other])
            .arg(raw)
            .arg(out)
            .run()?,
    }
    Ok(())
}

fn write_container_fs(ctx: &Ctx, size_mib: u64) -> anyhow::Result<()> {
    let disk = ctx
        .disk
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no output path"))?;
    crate::stage::assemble::create_sparse(disk, size_mib * 1024 * 1024)?;
    crate::host::Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-U", &ctx.fs_uuid])
        .args(["-E", crate::stage::assemble::LAZY_JOURNAL, "-d"])
        .arg(&ctx.rootfs)
        .arg(disk)
        .run()?;
    Ok(())
}

/// `name=version` of every package dpkg knows as installed in the tree.
pub fn installed_packages(root: &Path) -> Vec<String> {
    let out = crate::host::Cmd::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f", "${db:Status-Abbrev}\t${Package}=${Version}\n"])
        .output()
        .unwrap_or_default();
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("ii"))
        .filter_map(|l| l.split('\t').nth(1))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// Those of `packages` that the tree's dpkg database does not list as installed
/// (a virtual or arch-qualified name counts as missing: apt resolves it).
pub fn missing_packages(root: &Path, packages: &[String]) -> Vec<String> {
    let installed: std::collections::HashSet<String> = installed_packages(root)
        .into_iter()
        .filter_map(|p| p.split_once('=').map(|(name, _)| name.to_owned()))
        .collect();
    packages
        .iter()
        .filter(|p| !installed.contains(p.as_str()))
        .cloned()
        .collect()
}

pub fn recipe_digest(recipe: &Recipe) -> String {
    use sha2::{Digest, Sha256};
    let mut value = serde_json::to_value(recipe).unwrap_or_default();
    // Where the recipe was read from does not change what it builds.
    if let Some(o) = value.as_object_mut() {
        o.remove("source");
    }
    hex::encode(Sha256::digest(value.to_string().as_bytes()))
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_rfc3339() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    let (y, m, d) = civil_date((secs / 86_400) as i64);
    let t = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        t / 3600,
        (t % 3600) / 60,
        t % 60
    )
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// civil-from-days algorithm).
fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_packages_reads_only_installed_stanzas() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("var/lib/dpkg")).unwrap();
        std::fs::write(
            d.path().join("var/lib/dpkg/status"),
            "Package: curl\nStatus: install ok installed\nVersion: 1\n\n\
             Package: openssh-server\nStatus: deinstall ok config-files\nVersion: 1\n\n\
             Package: udev\nVersion: 2\nStatus: install ok installed\n",
        )
        .unwrap();
        let want: Vec<String> = ["curl", "openssh-server", "udev", "linux-image-cloud-amd64"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            super::missing_packages(d.path(), &want),
            ["openssh-server", "linux-image-cloud-amd64"]
        );
        // No dpkg database at all: everything is missing.
        assert_eq!(
            super::missing_packages(&d.path().join("none"), &want).len(),
            4
        );
    }

    #[test]
    fn artefact_names_swap_the_extension() {
        assert_eq!(
            super::artefact_name("conpaas.img", "qcow2"),
            "conpaas.qcow2"
        );
        assert_eq!(super::artefact_name("x.raw", "vdi"), "x.vdi");
        assert_eq!(super::artefact_name("plain", "tar.zst"), "plain.tar.zst");
    }

    #[test]
    fn dates() {
        assert_eq!(super::civil_date(0), (1970, 1, 1));
        assert_eq!(super::civil_date(19_723), (2024, 1, 1));
        assert_eq!(super::civil_date(20_513), (2026, 3, 1));
    }

    #[test]
    fn rfc3339_shape() {
        let s = super::now_rfc3339();
        assert_eq!(s.len(), 20);
        assert!(s.starts_with("20"));
        assert!(s.ends_with('Z'));
    }
}
