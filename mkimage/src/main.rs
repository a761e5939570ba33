//! The `mkimage` command line: parse, call the library, map errors to exit codes
//! (0 ok, 1 a failed build or check, 2 bad input, 130 interrupted).

use clap::{Args, Parser, Subcommand};
use mkimage::recipe::{self, HostFacts, Overrides, RecipeInput};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mkimage",
    version,
    about = "Build, verify, customize and register cloud VM images for ConPaaS-style services",
    long_about = "mkimage builds bootable Debian images from typed recipe stages (debootstrap, system, \
kernel, cloud, bootloader, assemble), caches the bootstrapped base, writes images atomically with a \
manifest and MD5/SHA-256 sums, verifies them, and boots them under QEMU to prove they work.\n\n\
It also reads the original ConPaaS create-img-script.cfg.",
    after_help = "Examples:\n  sudo mkimage build -o out/                      # default image for this host's Debian\n  \
sudo mkimage build --cloud ec2 --hypervisor xen -o out/\n  \
sudo mkimage build --config create-img-script.cfg -o out/\n  \
mkimage plan --recipe fixtures/recipes/good/minimal.toml\n  \
mkimage verify out/conpaas.img\n  \
sudo mkimage boot-test out/conpaas.img"
)]
struct Cli {
    /// More output on the terminal (-v debug, -vv trace). The build log always has everything.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an image.
    #[command(after_help = "Examples:\n  sudo mkimage build -o out/\n  \
sudo mkimage build --cloud ec2 --hypervisor xen --size 3G -o out/\n  \
sudo mkimage build --config create-img-script.cfg --services helloworld -o out/\n\n\
The image is written as OUTPUT_DIR/FILENAME only when every stage succeeded, with \
FILENAME.manifest.json, FILENAME.build.log, MD5SUMS and SHA256SUMS beside it. \
On failure or Ctrl-C nothing is left mounted or attached and no file appears at the output path.")]
    Build {
        #[command(flatten)]
        input: InputArgs,
        /// Output directory.
        #[arg(short = 'o', long = "output-dir", default_value = "out")]
        output_dir: PathBuf,
        /// Where the stage cache lives.
        #[arg(long, env = "MKIMAGE_CACHE_DIR", default_value = "/var/cache/mkimage")]
        cache_dir: PathBuf,
        /// Where work directories of running builds live.
        #[arg(long, env = "MKIMAGE_STATE_DIR", default_value = "/var/lib/mkimage")]
        state_dir: PathBuf,
        /// Print the plan and stop (same as `mkimage plan`).
        #[arg(long)]
        dry_run: bool,
        /// Run this stage and every later one even when the cache has them (e.g.
        /// `--rebuild-from debootstrap` to take fresh packages from the mirror).
        #[arg(long, value_name = "STAGE")]
        rebuild_from: Option<String>,
    },
    /// Show the ordered stages, their inputs, cache keys and cache hits, without touching the host.
    #[command(
        after_help = "Examples:\n  mkimage plan\n  mkimage plan --config create-img-script.cfg\n  mkimage plan --recipe r.toml --cloud ec2"
    )]
    Plan {
        #[command(flatten)]
        input: InputArgs,
        #[arg(long, env = "MKIMAGE_CACHE_DIR", default_value = "/var/cache/mkimage")]
        cache_dir: PathBuf,
        /// Print the recipe as JSON after resolving defaults and overrides.
        #[arg(long)]
        json: bool,
        /// Plan as `build --rebuild-from STAGE` would.
        #[arg(long, value_name = "STAGE")]
        rebuild_from: Option<String>,
    },
    /// Inspect or shrink the stage cache.
    #[command(subcommand)]
    Cache(CacheCmd),
    /// Release what dead builds left on this host (mounts, loop devices, processes,
    /// partial files, work directories), as recorded in their crash journals.
    #[command(
        after_help = "Every build writes down what it is about to mount, attach, start or create before doing so (STATE_DIR/journal/). A build killed with SIGKILL, or a power loss, leaves its journal behind; `mkimage gc` finds journals whose process is gone and releases what they list, in reverse order. Journals of running builds are left alone. `mkimage build` warns at start when there is something to collect.\n\nExit code 1 when something could not be released."
    )]
    Gc {
        #[arg(long, env = "MKIMAGE_STATE_DIR", default_value = "/var/lib/mkimage")]
        state_dir: PathBuf,
        /// Only report what would be released.
        #[arg(long)]
        dry_run: bool,
        /// Print the actions as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check an image's MD5 and SHA-256 (one read) against its manifest, the sums files, or given digests.
    #[command(
        after_help = "Examples:\n  mkimage verify out/conpaas.img\n  mkimage verify conpaas.img --md5 0123abcd...\n  \
mkimage verify conpaas.img --manifest conpaas.img.manifest.json\n\nExit code 1 on a mismatch."
    )]
    Verify {
        image: PathBuf,
        #[arg(long)]
        md5: Option<String>,
        #[arg(long)]
        sha256: Option<String>,
        /// Manifest to check against (default: IMAGE.manifest.json, then MD5SUMS/SHA256SUMS).
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Boot an image under QEMU (snapshot mode: the image is not modified) and wait until it is ready.
    #[command(
        name = "boot-test",
        after_help = "Examples:\n  sudo mkimage boot-test out/conpaas.img\n  \
mkimage boot-test out/conpaas.img --accel tcg --timeout 120 --forward 18080:8080\n\n\
KVM is used when it can boot a guest on this host; otherwise (no vmx/svm, or a nested \
software hypervisor) TCG is used and the reason is printed."
    )]
    BootTest {
        image: PathBuf,
        /// Image format (raw, qcow2, vdi, vmdk); default from the file extension.
        #[arg(long)]
        format: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        accel: mkimage::boot::Accel,
        /// Seconds to wait for readiness.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Text on the serial console that means "ready".
        #[arg(long, default_value = mkimage::stage::system::READY_MARKER)]
        ready_marker: String,
        /// Forward 127.0.0.1:HOST to the guest's GUEST port (repeatable), e.g. 18443:443.
        #[arg(long, value_parser = parse_forward)]
        forward: Vec<(u16, u16)>,
        /// Serial console log (default: IMAGE.serial.log).
        #[arg(long)]
        serial_log: Option<PathBuf>,
        /// Contextualization data: a user-data file, or a directory with user_data,
        /// meta_data.json and/or ssh_key.pub.
        #[arg(long)]
        context: Option<PathBuf>,
        /// How the guest gets the context: an OpenStack config drive, or an EC2
        /// metadata service (IMDSv2) at 169.254.169.254.
        #[arg(long, value_enum, default_value = "configdrive")]
        context_via: ContextVia,
        /// Ready when this shell command exits 0 (polled every second), instead of the serial marker.
        #[arg(long)]
        ready_command: Option<String>,
        /// Relay guest connections to IP:PORT to a host address, e.g. 10.0.2.100:4443=127.0.0.1:4443.
        #[arg(long, value_parser = parse_guest_forward)]
        guest_forward: Vec<mkimage::boot::GuestForward>,
    },
    /// Relay stdin/stdout to a TCP address (qemu runs this for guest forwards).
    #[command(hide = true)]
    Relay { addr: String },
    /// Register an image with a cloud: EC2 (EBS snapshot + AMI) or OpenStack (Glance).
    #[command(subcommand)]
    Register(mkimage::registration::RegisterCmd),
    /// Put an application (and packages) into a copy of an existing image, safely.
    Preinstall(mkimage::preinstall::PreinstallArgs),
    /// Print the JSON Schema of the TOML recipe format.
    Schema,
    /// ConPaaS services of the workspace.
    #[command(subcommand)]
    Service(ServiceCmd),
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Create a new service from the blueprint templates (recipes/blueprint/): recipe,
    /// config annexes, runtime module with an example method on each side, its test, and
    /// the registration lines.
    #[command(
        after_help = "Examples:\n  mkimage service new demo\n  mkimage service new fooBar --workspace ~/src/mkimage --description \"Foo as a service\""
    )]
    New {
        /// Service name: ASCII letters and digits, starting with a letter (fooBar → foobar, FooBar, FOOBAR).
        name: String,
        /// The workspace to add it to (default: the one containing the current directory).
        #[arg(long)]
        workspace: Option<PathBuf>,
        /// One-line description for the recipe and the module documentation.
        #[arg(long)]
        description: Option<String>,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List cache entries (least recently used first) with their sizes.
    Ls {
        #[arg(long, env = "MKIMAGE_CACHE_DIR", default_value = "/var/cache/mkimage")]
        cache_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Remove least recently used entries until the cache is at most --max-size.
    #[command(
        after_help = "Examples:\n  mkimage cache prune --max-size 5G\n  mkimage cache prune --max-size 0   # empty it\n\n\
Layers share unchanged files with their parent layer through hard links, so removing an \
entry frees only what no other entry holds. Safe while builds run: a build reading an \
entry holds a shared lock, and entries are made incomplete before they are removed."
    )]
    Prune {
        #[arg(long, env = "MKIMAGE_CACHE_DIR", default_value = "/var/cache/mkimage")]
        cache_dir: PathBuf,
        /// Largest size to keep: 5G, 500M, 0 …
        #[arg(long, value_parser = mkimage::cache::parse_size)]
        max_size: u64,
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args, Clone)]
struct InputArgs {
    /// A TOML recipe.
    #[arg(long, conflicts_with = "config")]
    recipe: Option<PathBuf>,
    /// The original ConPaaS create-img-script.cfg.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Target cloud: ec2, openstack, opennebula, vbox.
    #[arg(long)]
    cloud: Option<String>,
    /// Hypervisor: kvm or xen (ec2 forces xen).
    #[arg(long)]
    hypervisor: Option<String>,
    /// Image size: MiB, or with a unit (3072M, 2G).
    #[arg(long)]
    size: Option<String>,
    /// Debian release (default: the host's).
    #[arg(long)]
    dist: Option<String>,
    /// Debian mirror URL (default: the one the host's apt uses).
    #[arg(long)]
    mirror: Option<String>,
    /// Output file name (e.g. conpaas.img).
    #[arg(long)]
    output: Option<String>,
    /// Comma-separated services (e.g. helloworld,mysql).
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<String>>,
    /// Layout: disk, container or nutshell.
    #[arg(long)]
    layout: Option<String>,
    /// Output formats, comma-separated: raw, qcow2, vdi, vmdk, ova (an OVF appliance for
    /// VirtualBox/VMware), tar (container layout).
    #[arg(long, value_delimiter = ',')]
    format: Option<Vec<String>>,
    /// Prune and shrink the image (true/false).
    #[arg(long)]
    optimize: Option<bool>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ContextVia {
    Configdrive,
    Ec2,
}

fn parse_guest_forward(s: &str) -> Result<mkimage::boot::GuestForward, String> {
    let (g, h) = s
        .split_once('=')
        .ok_or("expected GUEST_IP:PORT=HOST:PORT")?;
    let (ip, port) = g.rsplit_once(':').ok_or("expected GUEST_IP:PORT")?;
    Ok(mkimage::boot::GuestForward {
        guest_ip: ip.to_string(),
        guest_port: port
            .parse()
            .map_err(|_| format!("bad guest port `{port}`"))?,
        host: h.to_string(),
    })
}

fn parse_forward(s: &str) -> Result<(u16, u16), String> {
    let (h, g) = s
        .split_once(':')
        .ok_or("expected HOST:GUEST, e.g. 18443:443")?;
    Ok((
        h.parse().map_err(|_| format!("bad host port `{h}`"))?,
        g.parse().map_err(|_| format!("bad guest port `{g}`"))?,
    ))
}

impl InputArgs {
    fn load(&self) -> Result<recipe::Recipe, recipe::RecipeError> {
        let input = match (&self.recipe, &self.config) {
            (Some(r), _) => RecipeInput::Toml(r.clone()),
            (None, Some(c)) => RecipeInput::Legacy(c.clone()),
            (None, None) => RecipeInput::Defaults,
        };
        let overrides = Overrides {
            cloud: self.cloud.clone(),
            hypervisor: self.hypervisor.clone(),
            size: self.size.clone(),
            dist: self.dist.clone(),
            output: self.output.clone(),
            services: self.services.clone(),
            layout: self.layout.clone(),
            formats: self.format.clone(),
            mirror: self.mirror.clone(),
            optimize: self.optimize,
        };
        recipe::load(&input, &overrides, &HostFacts::detect())
    }
}

const EXIT_FAILED: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let cli = Cli::parse();
    mkimage::logging::init(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn bad_input(e: impl std::fmt::Display) -> Failure {
    (EXIT_BAD_INPUT, e.to_string())
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Gc {
            state_dir,
            dry_run,
            json,
        } => {
            let actions = mkimage::journal::collect(&state_dir, dry_run);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&actions).unwrap_or_default()
                );
            } else if actions.is_empty() {
                println!("nothing to collect: no dead build left a journal");
            } else {
                for a in &actions {
                    println!("build {}: {}: {}", a.journal, a.resource, a.outcome);
                }
            }
            match actions.iter().filter(|a| !a.ok).count() {
                0 => Ok(()),
                n => Err((
                    EXIT_FAILED,
                    format!("{n} resource(s) could not be released; see above"),
                )),
            }
        }
        Command::Cache(CacheCmd::Ls { cache_dir, json }) => {
            let cache = mkimage::cache::Cache::new(&cache_dir);
            let (entries, total) = cache
                .entries()
                .map_err(|e| (EXIT_FAILED, format!("{e:#}")))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"dir": cache_dir, "total_bytes": total, "entries": entries})
                );
                return Ok(());
            }
            println!(
                "{:<14} {:<18} {:>10} {:>10}  {:<20}  created",
                "stage", "key", "size", "exclusive", "last used"
            );
            for e in &entries {
                println!(
                    "{:<14} {:<18} {:>10} {:>10}  {:<20}  {}",
                    e.stage,
                    &e.key[..16.min(e.key.len())],
                    human(e.bytes),
                    human(e.exclusive_bytes),
                    mkimage::build::rfc3339(e.last_used),
                    mkimage::build::rfc3339(e.created)
                );
            }
            println!(
                "{} entries, {} on disk in {} (layers share unchanged files)",
                entries.len(),
                human(total),
                cache_dir.display()
            );
            Ok(())
        }
        Command::Cache(CacheCmd::Prune {
            cache_dir,
            max_size,
            dry_run,
        }) => {
            let cache = mkimage::cache::Cache::new(&cache_dir);
            let (removed, left) = cache
                .prune(max_size, dry_run)
                .map_err(|e| (EXIT_FAILED, format!("{e:#}")))?;
            for e in &removed {
                println!(
                    "{} {} {} ({} exclusive)",
                    if dry_run { "would remove" } else { "removed" },
                    e.stage,
                    &e.key[..16.min(e.key.len())],
                    human(e.exclusive_bytes)
                );
            }
            println!(
                "{} entries {}; the cache {} {}",
                removed.len(),
                if dry_run { "to remove" } else { "removed" },
                if dry_run { "would hold" } else { "holds" },
                human(left)
            );
            Ok(())
        }
        Command::Preinstall(args) => {
            match with_journal("mkimage preinstall", || mkimage::preinstall::run(&args)) {
                Ok(rep) => {
                    println!("{}", rep.output.display());
                    eprintln!(
                        "preinstalled into {} (manifest {})",
                        rep.output.display(),
                        rep.manifest.display()
                    );
                    Ok(())
                }
                Err(e) => Err((e.exit_code(), e.to_string())),
            }
        }
        Command::Register(cmd) => match with_journal("mkimage register", || {
            register::journal::set_hook(Box::new(mkimage::journal::CloudHook));
            mkimage::registration::run(&cmd)
        }) {
            Ok(rec) => {
                println!("{}", serde_json::to_string_pretty(&rec).unwrap_or_default());
                Ok(())
            }
            Err(e) => match e.downcast_ref::<mkimage::verify::VerifyError>() {
                Some(mkimage::verify::VerifyError::Mismatch { .. }) | None => {
                    Err((EXIT_FAILED, format!("{e:#}")))
                }
                Some(_) => Err(bad_input(format!("{e:#}"))),
            },
        },
        Command::Schema => {
            println!("{}", recipe::json_schema());
            Ok(())
        }
        Command::Service(ServiceCmd::New {
            name,
            workspace,
            description,
        }) => {
            let ws = match workspace {
                Some(w) => w,
                None => {
                    let cwd = std::env::current_dir().map_err(bad_input)?;
                    mkimage::scaffold::find_workspace(&cwd).map_err(bad_input)?
                }
            };
            let created = mkimage::scaffold::new_service(&ws, &name, description.as_deref())
                .map_err(|e| bad_input(format!("{e:#}")))?;
            print!("{}", mkimage::scaffold::next_steps(&created));
            Ok(())
        }
        Command::Plan {
            input,
            cache_dir,
            json,
            rebuild_from,
        } => {
            let r = input.load().map_err(bad_input)?;
            let cache = mkimage::cache::Cache::new(&cache_dir);
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                return Ok(());
            }
            let planned =
                mkimage::plan::plan_with(&r, &cache, rebuild_from.as_deref()).map_err(bad_input)?;
            print!("{}", mkimage::plan::render(&r, &planned, &cache));
            if let Some(msg) = recipe::preflight_dist_message(&r) {
                println!("\nnote: {msg}");
            }
            Ok(())
        }
        Command::Build {
            input,
            output_dir,
            cache_dir,
            state_dir,
            dry_run,
            rebuild_from,
        } => {
            let r = input.load().map_err(bad_input)?;
            let cache = mkimage::cache::Cache::new(&cache_dir);
            if dry_run {
                let planned = mkimage::plan::plan_with(&r, &cache, rebuild_from.as_deref())
                    .map_err(bad_input)?;
                print!("{}", mkimage::plan::render(&r, &planned, &cache));
                return Ok(());
            }
            let opts = mkimage::build::BuildOptions {
                output_dir,
                state_dir,
                cache_dir,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                rebuild_from,
            };
            match mkimage::build::build(&r, &opts) {
                Ok(rep) => {
                    println!("{}", rep.image.display());
                    eprintln!(
                        "built in {:.1} s: {} ({} MiB apparent, {} MiB allocated); manifest {}",
                        rep.seconds,
                        rep.image.display(),
                        rep.size >> 20,
                        rep.allocated >> 20,
                        rep.manifest.display()
                    );
                    Ok(())
                }
                Err(e @ mkimage::build::BuildError::Interrupted { .. }) => {
                    Err((EXIT_INTERRUPTED, e.to_string()))
                }
                Err(e) => Err((EXIT_FAILED, e.to_string())),
            }
        }
        Command::Verify {
            image,
            md5,
            sha256,
            manifest,
        } => {
            use mkimage::verify::{Expected, VerifyError};
            let expected = if md5.is_some() || sha256.is_some() {
                for (k, v) in [("--md5", &md5), ("--sha256", &sha256)] {
                    if let Some(v) = v {
                        let len = if k == "--md5" { 32 } else { 64 };
                        if v.len() != len || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                            return Err(bad_input(format!(
                                "{k} takes {len} hex digits, got `{v}`"
                            )));
                        }
                    }
                }
                Expected {
                    md5,
                    sha256,
                    source: "command line".into(),
                }
            } else if let Some(m) = manifest {
                Expected::from_manifest(&m, &image).map_err(bad_input)?
            } else {
                Expected::beside(&image)
            };
            let size = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
            let bar = mkimage::progress::bytes(true, size, "verifying".into());
            let res = mkimage::verify::verify(&image, &expected, |n| bar.set_position(n));
            bar.finish_and_clear();
            match res {
                Ok(d) => {
                    println!(
                        "{}: OK (md5 {}, sha256 {}, checked against {})",
                        image.display(),
                        d.md5,
                        d.sha256,
                        expected.source
                    );
                    Ok(())
                }
                Err(e @ VerifyError::Mismatch { .. }) => Err((EXIT_FAILED, e.to_string())),
                Err(e) => Err(bad_input(e)),
            }
        }
        Command::Relay { addr } => mkimage::context::relay(&addr)
            .map_err(|e| (EXIT_FAILED, format!("relay to {addr}: {e}"))),
        Command::BootTest {
            image,
            format,
            accel,
            timeout,
            memory,
            ready_marker,
            forward,
            serial_log,
            context,
            context_via,
            ready_command,
            guest_forward,
        } => {
            if !image.exists() {
                return Err(bad_input(format!("{}: no such image", image.display())));
            }
            if image.extension().is_some_and(|e| e == "ova") {
                return Err(bad_input(format!(
                    "{}: an .ova is an archive for VirtualBox or VMware to import; boot-test \
                     the raw image or the VMDK inside it (tar -xf)",
                    image.display()
                )));
            }
            let log = serial_log.unwrap_or_else(|| {
                let mut s = image.as_os_str().to_owned();
                s.push(".serial.log");
                PathBuf::from(s)
            });
            let mut o = mkimage::boot::BootOptions::new(&image, &log);
            o.format = format.unwrap_or_else(|| format_from_extension(&image));
            o.accel = accel;
            o.timeout = Duration::from_secs(timeout);
            o.memory_mib = memory;
            o.ready = match ready_command {
                Some(c) => mkimage::boot::Readiness::Command(c),
                None => mkimage::boot::Readiness::SerialMarker(ready_marker),
            };
            o.forwards = forward;
            o.guest_forwards = guest_forward;
            // Held until the boot test ends: the config drive's temp dir, the metadata server.
            let work = tempfile::tempdir().map_err(|e| (EXIT_FAILED, e.to_string()))?;
            let mut _imds = None;
            if let Some(ctx) = &context {
                let data =
                    mkimage::context::InstanceData::from_path(ctx, "conpaas").map_err(bad_input)?;
                match context_via {
                    ContextVia::Configdrive => {
                        let iso = work.path().join("config-2.iso");
                        mkimage::context::make_config_drive(&data, &iso, work.path())
                            .map_err(|e| (EXIT_FAILED, format!("config drive: {e:#}")))?;
                        o.extra_drives.push(iso);
                    }
                    ContextVia::Ec2 => {
                        let imds = mkimage::context::Imds::start(data)
                            .map_err(|e| (EXIT_FAILED, e.to_string()))?;
                        o.user_net = Some("169.254.0.0/16".into());
                        o.guest_forwards.push(mkimage::boot::GuestForward {
                            guest_ip: "169.254.169.254".into(),
                            guest_port: 80,
                            host: format!("127.0.0.1:{}", imds.port()),
                        });
                        _imds = Some(imds);
                    }
                }
            }
            eprintln!(
                "booting {} under qemu (serial log {})",
                image.display(),
                log.display()
            );
            match with_journal("mkimage boot-test", || mkimage::boot::boot_test(&o)) {
                Ok(r) => {
                    println!(
                        "ready after {:.1} s under {}{}",
                        r.seconds_to_ready,
                        r.accel.to_uppercase(),
                        r.kvm_note
                            .map(|n| format!(" (KVM not used: {n})"))
                            .unwrap_or_default()
                    );
                    Ok(())
                }
                Err(mkimage::boot::BootError::Interrupted) => {
                    Err((EXIT_INTERRUPTED, "interrupted; qemu was stopped".into()))
                }
                Err(e) => Err((EXIT_FAILED, e.to_string())),
            }
        }
    }
}

/// Runs `f` with a crash journal (see `mkimage gc`); without one if the state
/// directory cannot be written (e.g. not root), which only loses the gc safety net.
fn with_journal<T>(command: &str, f: impl FnOnce() -> T) -> T {
    let state = mkimage::build::default_state_dir();
    mkimage::build::warn_stale_journals(&state);
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    let _journal = match mkimage::journal::begin(&state, &id, command) {
        Ok(j) => Some(j),
        Err(e) => {
            tracing::debug!("no crash journal under {}: {e}", state.display());
            None
        }
    };
    f()
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn format_from_extension(p: &std::path::Path) -> String {
    match p.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        Some("vdi") => "vdi",
        Some("vmdk") => "vmdk",
        _ => "raw",
    }
    .to_string()
}
