//! Boot-time contextualization: `cps context apply`.
//!
//! The image runs this once per boot from a oneshot systemd unit (no cloud-init, no curl, no
//! python in the image). It replaces the original `rc.local` pieces (998-ec2, 998-openstack,
//! 998-opennebula):
//!
//! 1. find the contextualization data — in `auto` order: OpenStack config drive (label
//!    `config-2`), OpenNebula context CD (label `CONTEXT`), EC2 instance metadata (IMDSv2,
//!    IMDSv1 fallback), OpenStack metadata service;
//! 2. once per instance id (state file `{state_dir}/instance-id`): install the SSH public
//!    keys into `/root/.ssh/authorized_keys`, set the host name, run the user-data script.
//!    On later boots of the same instance nothing is done: the original re-ran user-data on
//!    every boot (its run-once line was commented out).
//!
//! Every path is taken under [`ApplyOptions::root`], so tests run against a temporary tree; the
//! kernel host name is only set, and `systemd-run` only used, when `root` is `/`.
//!
//! **The agent outlives the oneshot unit.** The rendered start script backgrounds
//! `cps agent` with `nohup … &`. When a oneshot service's main process exits, systemd kills
//! whatever is left in the service's cgroup (default `KillMode=control-group`). So, when
//! systemd is running (`/run/systemd/system` exists) and `systemd-run` is installed, the
//! user-data script is started as `systemd-run --scope --unit=cps-userdata-… -- SCRIPT`:
//! systemd-run moves itself into a new transient *scope* unit and execs the script, so the
//! script and everything it starts live in that scope's cgroup, not in the unit's. We still
//! are the script's parent, so we wait for it, enforce the timeout and collect its exit
//! status directly. (`systemd-run --wait` would make it a transient *service*, whose own
//! cgroup is killed when the script exits: the agent would die with it.) Without systemd the
//! script is run directly.
//!
//! User-data output goes to `/var/log/cps-userdata.log` (appended; the file is the script's
//! stdout and stderr, so background daemons keep a valid descriptor after we exit) and is
//! echoed to our stdout — the journal and the console — while the script runs.

pub mod http;
pub mod iso9660;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use http::{HttpError, Timeouts};

/// Where contextualization data can come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    ConfigDrive,
    OpenNebula,
    Ec2,
    OpenStack,
}

impl SourceKind {
    pub const AUTO: [SourceKind; 4] = [
        SourceKind::ConfigDrive,
        SourceKind::OpenNebula,
        SourceKind::Ec2,
        SourceKind::OpenStack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SourceKind::ConfigDrive => "configdrive",
            SourceKind::OpenNebula => "opennebula",
            SourceKind::Ec2 => "ec2",
            SourceKind::OpenStack => "openstack",
        }
    }

    fn is_http(self) -> bool {
        matches!(self, SourceKind::Ec2 | SourceKind::OpenStack)
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `auto` or a comma-separated list of `configdrive,ec2,openstack,opennebula`.
pub fn parse_sources(s: &str) -> Result<Vec<SourceKind>, BootCtxError> {
    let mut out = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let k = match p.to_ascii_lowercase().as_str() {
            "auto" => {
                out.extend(SourceKind::AUTO);
                continue;
            }
            "configdrive" | "config-drive" | "config-2" => SourceKind::ConfigDrive,
            "opennebula" | "one" => SourceKind::OpenNebula,
            "ec2" => SourceKind::Ec2,
            "openstack" => SourceKind::OpenStack,
            _ => return Err(BootCtxError::Usage(format!("unknown source '{p}'"))),
        };
        out.push(k);
    }
    if out.is_empty() {
        return Err(BootCtxError::Usage("no source given".into()));
    }
    let mut seen = Vec::new();
    out.retain(|k| {
        let new = !seen.contains(k);
        seen.push(*k);
        new
    });
    Ok(out)
}

/// How the user-data script is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// `SystemdScope` when `root` is `/`, systemd runs and `systemd-run` exists; else `Direct`.
    Auto,
    /// Child process of `cps` (its own process group).
    Direct,
    /// `systemd-run --scope --unit=cps-userdata-… -- SCRIPT`.
    SystemdScope,
}

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    pub sources: Vec<SourceKind>,
    /// Absolute, taken under `root`.
    pub state_dir: PathBuf,
    /// Base URL of the metadata service (EC2 and OpenStack).
    pub metadata_url: String,
    /// Prefix for every file path (`/` on a real boot).
    pub root: PathBuf,
    /// Config drive device or image (skips the label search).
    pub config_drive: Option<PathBuf>,
    /// OpenNebula context CD device or image (skips the label search).
    pub context_cd: Option<PathBuf>,
    pub userdata_timeout: Duration,
    /// How long to keep retrying the metadata service while nothing answers at all.
    pub network_wait: Duration,
    pub http: Timeouts,
    pub runner: Runner,
    /// `systemd-run` to use (default: searched in `PATH`).
    pub systemd_run: Option<PathBuf>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            sources: SourceKind::AUTO.to_vec(),
            state_dir: PathBuf::from("/var/lib/cps/context"),
            metadata_url: "http://169.254.169.254".into(),
            root: PathBuf::from("/"),
            config_drive: None,
            context_cd: None,
            userdata_timeout: Duration::from_secs(600),
            network_wait: Duration::from_secs(60),
            http: Timeouts::default(),
            runner: Runner::Auto,
            systemd_run: None,
        }
    }
}

/// The data a source provided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaData {
    pub instance_id: String,
    pub hostname: Option<String>,
    /// OpenSSH public key lines.
    pub public_keys: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ContextData {
    pub source: SourceKind,
    pub meta: MetaData,
    /// Raw user-data (possibly gzip-compressed).
    pub user_data: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserDataOutcome {
    /// No user-data, or this instance was already contextualized.
    None,
    /// User-data without a `#!` line: not run.
    NotScript,
    Exited(i32),
    Signaled(i32),
    /// Killed (with its process group) after `userdata_timeout`.
    TimedOut,
}

impl UserDataOutcome {
    pub fn failed(&self) -> bool {
        matches!(
            self,
            UserDataOutcome::Signaled(_) | UserDataOutcome::TimedOut
        ) || matches!(self, UserDataOutcome::Exited(c) if *c != 0)
    }
}

impl fmt::Display for UserDataOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserDataOutcome::None => f.write_str("none"),
            UserDataOutcome::NotScript => f.write_str("not-a-script"),
            UserDataOutcome::Exited(c) => write!(f, "exit {c}"),
            UserDataOutcome::Signaled(s) => write!(f, "signal {s}"),
            UserDataOutcome::TimedOut => f.write_str("timeout"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApplyReport {
    pub source: Option<SourceKind>,
    pub instance_id: Option<String>,
    /// The state file already named this instance: nothing was done.
    pub already_applied: bool,
    pub keys_added: usize,
    pub hostname: Option<String>,
    pub user_data: UserDataOutcome,
    /// The lines logged.
    pub log: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootCtxError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{0}: {1}")]
    Http(String, String),
    #[error("{0}")]
    Device(String),
    #[error("user-data: {0}")]
    UserData(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BootCtxError + '_ {
    move |source| BootCtxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `path` (absolute) taken under `root`.
pub fn rooted(root: &Path, path: &Path) -> PathBuf {
    let rel = path.strip_prefix("/").unwrap_or(path);
    root.join(rel)
}

fn is_real_root(root: &Path) -> bool {
    root.canonicalize()
        .map(|p| p == Path::new("/"))
        .unwrap_or(false)
}

struct Log<'a>(&'a mut Vec<String>);

impl Log<'_> {
    fn say(&mut self, msg: impl Into<String>) {
        let m = msg.into();
        println!("cps context: {m}");
        self.0.push(m);
    }
}

// ---------------------------------------------------------------- parsers

/// Parses OpenStack `meta_data.json`: `uuid` (required), `hostname`, `public_keys`
/// (`{name: key}`) and the newer `keys` (`[{"data": key}]`).
pub fn parse_meta_data_json(raw: &[u8]) -> Result<MetaData, BootCtxError> {
    let v: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| BootCtxError::Parse(format!("meta_data.json: {e}")))?;
    let instance_id = v
        .get("uuid")
        .and_then(|u| u.as_str())
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| BootCtxError::Parse("meta_data.json: no uuid".into()))?
        .trim()
        .to_string();
    let hostname = v
        .get("hostname")
        .and_then(|h| h.as_str())
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(String::from);
    let mut public_keys = Vec::new();
    if let Some(m) = v.get("public_keys").and_then(|k| k.as_object()) {
        for key in m.values().filter_map(|k| k.as_str()) {
            public_keys.extend(key_lines(key));
        }
    }
    if let Some(a) = v.get("keys").and_then(|k| k.as_array()) {
        for key in a
            .iter()
            .filter_map(|k| k.get("data"))
            .filter_map(|d| d.as_str())
        {
            public_keys.extend(key_lines(key));
        }
    }
    dedup(&mut public_keys);
    Ok(MetaData {
        instance_id,
        hostname,
        public_keys,
    })
}

fn key_lines(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

fn dedup(v: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|k| seen.insert(k.clone()));
}

/// Parses an OpenNebula `context.sh` without running it: `KEY=value` assignments (optionally
/// `export KEY=…`), values made of single-quoted (literal, may span lines, `'\''` for a quote),
/// double-quoted (`\"`, `\\`, `\$`, `` \` `` escapes) and unquoted parts. No variable or command
/// expansion is done. Comments and lines that are not assignments are skipped.
pub fn parse_context_sh(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let c: Vec<char> = text.chars().collect();
    let mut i = 0;
    let skip_line = |i: &mut usize| {
        while *i < c.len() && c[*i] != '\n' {
            *i += 1;
        }
    };
    while i < c.len() {
        while i < c.len()
            && (c[i] == ' ' || c[i] == '\t' || c[i] == '\n' || c[i] == '\r' || c[i] == ';')
        {
            i += 1;
        }
        if i >= c.len() {
            break;
        }
        if c[i] == '#' {
            skip_line(&mut i);
            continue;
        }
        let start = i;
        while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
            i += 1;
        }
        let mut key: String = c[start..i].iter().collect();
        if key == "export" && i < c.len() && (c[i] == ' ' || c[i] == '\t') {
            while i < c.len() && (c[i] == ' ' || c[i] == '\t') {
                i += 1;
            }
            let s2 = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            key = c[s2..i].iter().collect();
        }
        let valid_key = key
            .chars()
            .next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_');
        if !valid_key || i >= c.len() || c[i] != '=' {
            skip_line(&mut i);
            continue;
        }
        i += 1;
        let mut val = String::new();
        while i < c.len() {
            match c[i] {
                ' ' | '\t' | '\n' | '\r' | ';' => break,
                '\'' => {
                    i += 1;
                    while i < c.len() && c[i] != '\'' {
                        val.push(c[i]);
                        i += 1;
                    }
                    i += 1;
                }
                '"' => {
                    i += 1;
                    while i < c.len() && c[i] != '"' {
                        if c[i] == '\\'
                            && i + 1 < c.len()
                            && matches!(c[i + 1], '"' | '\\' | '$' | '`')
                        {
                            i += 1;
                        } else if c[i] == '\\' && i + 1 < c.len() && c[i + 1] == '\n' {
                            i += 2;
                            continue;
                        }
                        val.push(c[i]);
                        i += 1;
                    }
                    i += 1;
                }
                '\\' if i + 1 < c.len() => {
                    if c[i + 1] != '\n' {
                        val.push(c[i + 1]);
                    }
                    i += 2;
                }
                ch => {
                    val.push(ch);
                    i += 1;
                }
            }
        }
        out.insert(key, val);
    }
    out
}

/// Decodes hex, ignoring whitespace (as `xxd -p -r`).
pub fn decode_hex_loose(s: &str) -> Result<Vec<u8>, BootCtxError> {
    let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(clean).map_err(|e| BootCtxError::Parse(format!("hex: {e}")))
}

fn decode_base64_loose(s: &str) -> Result<Vec<u8>, BootCtxError> {
    use base64::Engine;
    let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean)
        .map_err(|e| BootCtxError::Parse(format!("base64: {e}")))
}

/// Turns the variables of an OpenNebula `context.sh` (`raw`, its bytes, gives the instance id:
/// `one-` + the first 16 hex digits of its SHA-256) into context data.
///
/// User-data: `USERDATA` (hex, as the original image read it), else `USER_DATA` (base64 when
/// `USER_DATA_ENCODING=base64`), else `START_SCRIPT_BASE64`, else `START_SCRIPT`.
/// Keys: `SSH_PUBLIC_KEY` (one per line). Host name: `SET_HOSTNAME`, else `HOSTNAME`.
pub fn opennebula_context(raw: &[u8]) -> Result<ContextData, BootCtxError> {
    let text = String::from_utf8_lossy(raw);
    let vars = parse_context_sh(&text);
    let get = |k: &str| {
        vars.get(k)
            .map(|v| v.as_str())
            .filter(|v| !v.trim().is_empty())
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, raw);
    let instance_id = format!("one-{}", &hex::encode(digest.as_ref())[..16]);
    let user_data = if let Some(h) = get("USERDATA") {
        Some(decode_hex_loose(h)?)
    } else if let Some(u) = get("USER_DATA") {
        if get("USER_DATA_ENCODING").is_some_and(|e| e.eq_ignore_ascii_case("base64")) {
            Some(decode_base64_loose(u)?)
        } else {
            Some(u.as_bytes().to_vec())
        }
    } else if let Some(b) = get("START_SCRIPT_BASE64") {
        Some(decode_base64_loose(b)?)
    } else {
        get("START_SCRIPT").map(|s| s.as_bytes().to_vec())
    };
    let mut public_keys = get("SSH_PUBLIC_KEY").map(key_lines).unwrap_or_default();
    dedup(&mut public_keys);
    Ok(ContextData {
        source: SourceKind::OpenNebula,
        meta: MetaData {
            instance_id,
            hostname: get("SET_HOSTNAME")
                .or(get("HOSTNAME"))
                .map(|h| h.trim().to_string()),
            public_keys,
        },
        user_data,
    })
}

/// Decompresses gzip data (magic `1f 8b`, concatenated members allowed); other data is
/// returned unchanged.
pub fn maybe_gunzip(data: &[u8]) -> Result<Vec<u8>, BootCtxError> {
    if !data.starts_with(&[0x1f, 0x8b]) {
        return Ok(data.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data)
        .take(http::MAX_BODY as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| BootCtxError::Parse(format!("gunzip user-data: {e}")))?;
    if out.len() > http::MAX_BODY {
        return Err(BootCtxError::Parse("gunzip user-data: too large".into()));
    }
    Ok(out)
}

/// A host name usable for `/etc/hostname` and sethostname(2): letters, digits, `-`, `.`;
/// longer than 63 bytes → its first label.
pub fn sanitize_hostname(h: &str) -> Option<String> {
    let h = h.trim().trim_end_matches('.');
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
    };
    if ok(h) {
        return Some(h.to_string());
    }
    let first = h.split('.').next().unwrap_or_default();
    ok(first).then(|| first.to_string())
}

// ---------------------------------------------------------------- sources

enum Probe {
    Found(ContextData),
    /// Something answered / exists, but it holds no data of this kind.
    Absent(String),
    /// Nothing answered (network not up yet?).
    Unreachable(String),
}

/// Finds a block device by filesystem label: `/dev/disk/by-label/LABEL` (udev), else
/// `blkid -L LABEL`, else ISO 9660 volume labels of `/sys/class/block/*`.
pub fn find_by_label(root: &Path, label: &str) -> Option<PathBuf> {
    let link = rooted(root, &Path::new("/dev/disk/by-label").join(label));
    if link.exists() {
        return Some(link);
    }
    if !is_real_root(root) {
        return None;
    }
    if let Ok(o) = Command::new("blkid")
        .args(["-L", label])
        .stderr(Stdio::null())
        .output()
    {
        let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if o.status.success() && !p.is_empty() {
            return Some(PathBuf::from(p));
        }
    }
    let mut names: Vec<String> = fs::read_dir("/sys/class/block")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("ram") && !n.starts_with("loop"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| PathBuf::from("/dev").join(n))
        .find(|d| iso9660::volume_label(d).as_deref() == Some(label))
}

/// A read-only mount on a temporary directory, unmounted (and the directory removed) on drop.
struct MountGuard {
    dir: PathBuf,
    mounted: bool,
}

impl MountGuard {
    fn mount(dev: &Path, fstypes: &[&str]) -> Result<MountGuard, BootCtxError> {
        use nix::mount::{mount, MsFlags};
        let dir = std::env::temp_dir().join(format!(
            "cps-context-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        fs::create_dir(&dir).map_err(io_err(&dir))?;
        let mut g = MountGuard {
            dir,
            mounted: false,
        };
        let mut errs = Vec::new();
        for t in fstypes {
            match mount(
                Some(dev),
                &g.dir,
                Some(*t),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            ) {
                Ok(()) => {
                    g.mounted = true;
                    return Ok(g);
                }
                Err(e) => errs.push(format!("{t}: {e}")),
            }
        }
        Err(BootCtxError::Device(format!(
            "cannot mount {} read-only ({})",
            dev.display(),
            errs.join(", ")
        )))
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        use nix::mount::{umount2, MntFlags};
        if self.mounted && umount2(&self.dir, MntFlags::empty()).is_err() {
            let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Reads `files` (paths inside the medium) from an ISO 9660 device directly; when the
/// image has no Joliet tree or is not ISO 9660 (a vfat config drive), mounts it read-only.
fn read_medium(dev: &Path, files: &[&str]) -> Result<Vec<Option<Vec<u8>>>, BootCtxError> {
    match iso9660::Iso::open(dev) {
        Ok(mut iso) => {
            return files
                .iter()
                .map(|f| {
                    iso.read_file(f)
                        .map_err(|e| BootCtxError::Device(format!("{}: {e}", dev.display())))
                })
                .collect();
        }
        Err(iso9660::IsoError::Io(w, e)) => {
            return Err(BootCtxError::Device(format!("{w}: {e}")));
        }
        Err(_) => {}
    }
    let g = MountGuard::mount(dev, &["iso9660", "vfat"])?;
    files
        .iter()
        .map(|f| {
            let p = g.dir.join(f);
            match fs::read(&p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err(&p)(e)),
            }
        })
        .collect()
}

fn probe_config_drive(opts: &ApplyOptions) -> Result<Probe, BootCtxError> {
    let Some(dev) = opts
        .config_drive
        .clone()
        .or_else(|| find_by_label(&opts.root, "config-2"))
    else {
        return Ok(Probe::Absent("no device labelled config-2".into()));
    };
    let got = read_medium(
        &dev,
        &[
            "openstack/latest/meta_data.json",
            "openstack/latest/user_data",
        ],
    )?;
    let Some(meta) = &got[0] else {
        return Ok(Probe::Absent(format!(
            "{}: no openstack/latest/meta_data.json",
            dev.display()
        )));
    };
    Ok(Probe::Found(ContextData {
        source: SourceKind::ConfigDrive,
        meta: parse_meta_data_json(meta)?,
        user_data: got[1].clone(),
    }))
}

fn probe_opennebula(opts: &ApplyOptions) -> Result<Probe, BootCtxError> {
    let Some(dev) = opts
        .context_cd
        .clone()
        .or_else(|| find_by_label(&opts.root, "CONTEXT"))
    else {
        return Ok(Probe::Absent("no device labelled CONTEXT".into()));
    };
    let got = read_medium(&dev, &["context.sh"])?;
    match &got[0] {
        Some(raw) => Ok(Probe::Found(opennebula_context(raw)?)),
        None => Ok(Probe::Absent(format!("{}: no context.sh", dev.display()))),
    }
}

fn url_join(base: &str, path: &str) -> String {
    format!("{}{}", base.trim_end_matches('/'), path)
}

fn get(
    opts: &ApplyOptions,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<http::Response, HttpError> {
    http::request(
        "GET",
        &url_join(&opts.metadata_url, path),
        headers,
        opts.http,
    )
}

fn http_fail(what: &str, e: HttpError) -> BootCtxError {
    BootCtxError::Http(what.to_string(), e.to_string())
}

/// Body of an optional document: 200 → Some, 404 → None, else an error.
fn optional(
    what: &str,
    r: Result<http::Response, HttpError>,
) -> Result<Option<Vec<u8>>, BootCtxError> {
    let r = r.map_err(|e| http_fail(what, e))?;
    match r.status {
        200 => Ok(Some(r.body)),
        404 => Ok(None),
        s => Err(BootCtxError::Http(what.into(), format!("HTTP {s}"))),
    }
}

/// EC2 instance metadata. IMDSv2: `PUT /latest/api/token` (TTL header), then every GET
/// carries `X-aws-ec2-metadata-token`. When the PUT is answered with any non-200 status
/// (403 when IMDS tokens are disabled or the request is refused, 404/405 on EC2-compatible
/// services that only know v1, e.g. OpenStack's), the GETs are sent without a token (IMDSv1).
fn probe_ec2(opts: &ApplyOptions, log: &mut Log) -> Result<Probe, BootCtxError> {
    let put = http::request(
        "PUT",
        &url_join(&opts.metadata_url, "/latest/api/token"),
        &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
        opts.http,
    );
    let token = match put {
        Err(HttpError::Url(u, e)) => {
            return Err(BootCtxError::Usage(format!("--metadata-url {u}: {e}")))
        }
        Err(e) => return Ok(Probe::Unreachable(e.to_string())),
        Ok(r) if r.status == 200 => Some(String::from_utf8_lossy(&r.body).trim().to_string()),
        Ok(r) => {
            log.say(format!(
                "ec2: token request answered HTTP {}; falling back to IMDSv1",
                r.status
            ));
            None
        }
    };
    let hdr: Vec<(&str, &str)> = match &token {
        Some(t) => vec![("X-aws-ec2-metadata-token", t.as_str())],
        None => vec![],
    };
    let id = match get(opts, "/latest/meta-data/instance-id", &hdr) {
        Err(e) => return Ok(Probe::Unreachable(e.to_string())),
        Ok(r) if r.status == 200 => String::from_utf8_lossy(&r.body).trim().to_string(),
        Ok(r) if r.status == 401 || r.status == 403 => {
            return Err(BootCtxError::Http(
                "ec2 instance-id".into(),
                format!("HTTP {} (metadata token refused)", r.status),
            ))
        }
        Ok(r) => {
            return Ok(Probe::Absent(format!(
                "ec2: instance-id answered HTTP {}",
                r.status
            )))
        }
    };
    if id.is_empty() {
        return Ok(Probe::Absent("ec2: empty instance-id".into()));
    }
    let keys = optional(
        "ec2 public key",
        get(opts, "/latest/meta-data/public-keys/0/openssh-key", &hdr),
    )?;
    let user_data = optional("ec2 user-data", get(opts, "/latest/user-data", &hdr))?;
    let hostname = optional(
        "ec2 local-hostname",
        get(opts, "/latest/meta-data/local-hostname", &hdr),
    )?;
    let mut public_keys = keys
        .map(|k| key_lines(&String::from_utf8_lossy(&k)))
        .unwrap_or_default();
    dedup(&mut public_keys);
    Ok(Probe::Found(ContextData {
        source: SourceKind::Ec2,
        meta: MetaData {
            instance_id: id,
            hostname: hostname
                .map(|h| String::from_utf8_lossy(&h).trim().to_string())
                .filter(|h| !h.is_empty()),
            public_keys,
        },
        user_data,
    }))
}

fn probe_openstack(opts: &ApplyOptions) -> Result<Probe, BootCtxError> {
    let meta = match get(opts, "/openstack/latest/meta_data.json", &[]) {
        Err(HttpError::Url(u, e)) => {
            return Err(BootCtxError::Usage(format!("--metadata-url {u}: {e}")))
        }
        Err(e) => return Ok(Probe::Unreachable(e.to_string())),
        Ok(r) if r.status == 200 => r.body,
        Ok(r) => {
            return Ok(Probe::Absent(format!(
                "openstack: meta_data.json answered HTTP {}",
                r.status
            )))
        }
    };
    let meta = parse_meta_data_json(&meta)?;
    let user_data = optional(
        "openstack user_data",
        get(opts, "/openstack/latest/user_data", &[]),
    )?;
    Ok(Probe::Found(ContextData {
        source: SourceKind::OpenStack,
        meta,
        user_data,
    }))
}

/// Tries the sources in order. Local media once; the metadata services are retried (every
/// 2 s, up to `network_wait`) only while none of them answered at all.
pub fn discover(opts: &ApplyOptions) -> Result<Option<ContextData>, BootCtxError> {
    let mut lines = Vec::new();
    discover_logged(opts, &mut Log(&mut lines))
}

fn discover_logged(
    opts: &ApplyOptions,
    log: &mut Log,
) -> Result<Option<ContextData>, BootCtxError> {
    for k in opts.sources.iter().filter(|k| !k.is_http()) {
        let p = match k {
            SourceKind::ConfigDrive => probe_config_drive(opts)?,
            _ => probe_opennebula(opts)?,
        };
        match p {
            Probe::Found(d) => return Ok(Some(d)),
            Probe::Absent(why) | Probe::Unreachable(why) => log.say(format!("{k}: {why}")),
        }
    }
    let net: Vec<SourceKind> = opts
        .sources
        .iter()
        .copied()
        .filter(|k| k.is_http())
        .collect();
    if net.is_empty() {
        return Ok(None);
    }
    let deadline = Instant::now() + opts.network_wait;
    let mut round = 0u32;
    loop {
        round += 1;
        let mut answered = false;
        let mut last = String::new();
        for k in &net {
            let p = match k {
                SourceKind::Ec2 => probe_ec2(opts, log)?,
                _ => probe_openstack(opts)?,
            };
            match p {
                Probe::Found(d) => return Ok(Some(d)),
                Probe::Absent(why) => {
                    answered = true;
                    log.say(format!("{k}: {why}"));
                }
                Probe::Unreachable(why) => last = format!("{k}: {why}"),
            }
        }
        if answered {
            return Ok(None);
        }
        if Instant::now() + Duration::from_secs(2) > deadline {
            log.say(format!(
                "metadata service unreachable after {round} attempt(s): {last}"
            ));
            return Ok(None);
        }
        if round == 1 {
            log.say(format!(
                "{last}; retrying for up to {:?}",
                opts.network_wait
            ));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

// ---------------------------------------------------------------- actions

fn ensure_dir(p: &Path, mode: u32) -> Result<(), BootCtxError> {
    fs::create_dir_all(p).map_err(io_err(p))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(io_err(p))
}

/// Writes `data` to `p` atomically (temp file + rename) with `mode`.
fn write_atomic(p: &Path, data: &[u8], mode: u32) -> Result<(), BootCtxError> {
    let tmp = p.with_extension("cps-tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, p).map_err(io_err(p))
}

/// Appends the keys that are not there yet to `/root/.ssh/authorized_keys` (dir 0700,
/// file 0600); returns how many were added.
pub fn install_keys(root: &Path, keys: &[String]) -> Result<usize, BootCtxError> {
    if keys.is_empty() {
        return Ok(0);
    }
    let dir = rooted(root, Path::new("/root/.ssh"));
    ensure_dir(&dir, 0o700)?;
    let file = dir.join("authorized_keys");
    let existing = match fs::read_to_string(&file) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(&file)(e)),
    };
    let have: std::collections::HashSet<&str> = existing.lines().map(str::trim).collect();
    let new: Vec<&String> = keys.iter().filter(|k| !have.contains(k.trim())).collect();
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&file)
        .map_err(io_err(&file))?;
    let mut text = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') && !new.is_empty() {
        text.push('\n');
    }
    for k in &new {
        text.push_str(k.trim());
        text.push('\n');
    }
    f.write_all(text.as_bytes()).map_err(io_err(&file))?;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).map_err(io_err(&file))?;
    Ok(new.len())
}

fn set_hostname(root: &Path, name: &str, log: &mut Log) -> Result<(), BootCtxError> {
    let etc = rooted(root, Path::new("/etc"));
    ensure_dir_keep_mode(&etc)?;
    write_atomic(&etc.join("hostname"), format!("{name}\n").as_bytes(), 0o644)?;
    if is_real_root(root) {
        // SAFETY: the pointer and length describe a live byte slice for the whole call.
        let rc = unsafe { nix::libc::sethostname(name.as_ptr().cast(), name.len()) };
        if rc != 0 {
            log.say(format!(
                "sethostname({name}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn ensure_dir_keep_mode(p: &Path) -> Result<(), BootCtxError> {
    fs::create_dir_all(p).map_err(io_err(p))
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn find_systemd_run(opts: &ApplyOptions) -> Option<PathBuf> {
    opts.systemd_run.clone().or_else(|| which("systemd-run"))
}

fn unit_suffix(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(40)
        .collect();
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{s}-{t}")
}

/// Copies what was appended to `log` since `*off` to our stdout.
fn echo_new(log: &mut File, off: &mut u64) {
    let Ok(len) = log.metadata().map(|m| m.len()) else {
        return;
    };
    if len <= *off || log.seek(SeekFrom::Start(*off)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if (&mut *log).take(len - *off).read_to_end(&mut buf).is_ok() {
        *off += buf.len() as u64;
        print!("{}", String::from_utf8_lossy(&buf));
        let _ = std::io::stdout().flush();
    }
}

fn run_user_data(
    opts: &ApplyOptions,
    state: &Path,
    script: &[u8],
    instance_id: &str,
    source: SourceKind,
    log: &mut Log,
) -> Result<UserDataOutcome, BootCtxError> {
    let path = state.join("user-data.run");
    write_atomic(&path, script, 0o700)?;
    let log_path = rooted(&opts.root, Path::new("/var/log/cps-userdata.log"));
    if let Some(d) = log_path.parent() {
        ensure_dir_keep_mode(d)?;
    }
    let mut lf = OpenOptions::new()
        .append(true)
        .create(true)
        .read(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(io_err(&log_path))?;
    let mut off = lf.metadata().map_err(io_err(&log_path))?.len();
    writeln!(
        lf,
        "=== cps context apply: user-data of {source} instance {instance_id} ==="
    )
    .map_err(io_err(&log_path))?;
    let real_root = is_real_root(&opts.root);
    let scope = match opts.runner {
        Runner::Direct => None,
        Runner::SystemdScope => Some(
            find_systemd_run(opts)
                .ok_or_else(|| BootCtxError::UserData("systemd-run not found".into()))?,
        ),
        Runner::Auto => {
            if real_root && Path::new("/run/systemd/system").is_dir() {
                find_systemd_run(opts)
            } else {
                None
            }
        }
    };
    let mut cmd = match &scope {
        Some(sr) => {
            let unit = format!("cps-userdata-{}", unit_suffix(instance_id));
            log.say(format!("running user-data in scope {unit}.scope"));
            let mut c = Command::new(sr);
            c.args(["--scope", "--quiet", "--collect"])
                .arg(format!("--unit={unit}"))
                .arg("--description=ConPaaS user-data")
                .arg("--")
                .arg(&path);
            c
        }
        None => {
            log.say("running user-data");
            Command::new(&path)
        }
    };
    let out = lf.try_clone().map_err(io_err(&log_path))?;
    let err = lf.try_clone().map_err(io_err(&log_path))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .current_dir(&opts.root)
        .env("CPS_CONTEXT_ROOT", &opts.root)
        .env("CPS_INSTANCE_ID", instance_id)
        .env("CPS_CONTEXT_SOURCE", source.name())
        .process_group(0);
    // ETXTBSY: another thread of this process may have forked while the script file was
    // still open for writing; the window is short, so retry a few times.
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(BootCtxError::UserData(format!(
                    "starting {}: {e}",
                    path.display()
                )))
            }
        }
    };
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + opts.userdata_timeout;
    let outcome = loop {
        echo_new(&mut lf, &mut off);
        match child.try_wait() {
            Ok(Some(st)) => {
                break match (st.code(), st.signal()) {
                    (Some(c), _) => UserDataOutcome::Exited(c),
                    (None, Some(s)) => UserDataOutcome::Signaled(s),
                    _ => UserDataOutcome::Exited(-1),
                }
            }
            Ok(None) if Instant::now() >= deadline => {
                use nix::sys::signal::{killpg, Signal};
                log.say(format!(
                    "user-data still running after {:?}: killing its process group",
                    opts.userdata_timeout
                ));
                let _ = killpg(pgid, Signal::SIGTERM);
                let grace = Instant::now() + Duration::from_secs(5);
                while Instant::now() < grace {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = killpg(pgid, Signal::SIGKILL);
                let _ = child.wait();
                break UserDataOutcome::TimedOut;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(BootCtxError::UserData(format!("waiting: {e}"))),
        }
    };
    echo_new(&mut lf, &mut off);
    let _ = writeln!(lf, "=== user-data finished: {outcome} ===");
    let _ = fs::remove_file(&path);
    Ok(outcome)
}

/// Contextualizes this boot. See the module documentation.
pub fn apply(opts: &ApplyOptions) -> Result<ApplyReport, BootCtxError> {
    let mut lines = Vec::new();
    let r = apply_logged(opts, &mut lines);
    r.map(|mut rep| {
        rep.log = lines;
        rep
    })
}

fn apply_logged(opts: &ApplyOptions, lines: &mut Vec<String>) -> Result<ApplyReport, BootCtxError> {
    let mut log = Log(lines);
    if !opts.state_dir.is_absolute() {
        return Err(BootCtxError::Usage("--state-dir must be absolute".into()));
    }
    let mut rep = ApplyReport {
        source: None,
        instance_id: None,
        already_applied: false,
        keys_added: 0,
        hostname: None,
        user_data: UserDataOutcome::None,
        log: Vec::new(),
    };
    let Some(data) = discover_logged(opts, &mut log)? else {
        log.say("no contextualization data");
        return Ok(rep);
    };
    let id = data.meta.instance_id.trim().to_string();
    rep.source = Some(data.source);
    rep.instance_id = Some(id.clone());
    log.say(format!("source {}, instance {id}", data.source));

    let state = rooted(&opts.root, &opts.state_dir);
    let id_file = state.join("instance-id");
    if fs::read_to_string(&id_file).is_ok_and(|s| s.trim() == id) {
        rep.already_applied = true;
        log.say(format!(
            "instance {id} already contextualized: nothing to do"
        ));
        return Ok(rep);
    }

    rep.keys_added = install_keys(&opts.root, &data.meta.public_keys)?;
    if !data.meta.public_keys.is_empty() {
        log.say(format!(
            "authorized_keys: {} key(s) given, {} added",
            data.meta.public_keys.len(),
            rep.keys_added
        ));
    }
    if let Some(h) = &data.meta.hostname {
        match sanitize_hostname(h) {
            Some(name) => {
                set_hostname(&opts.root, &name, &mut log)?;
                log.say(format!("hostname {name}"));
                rep.hostname = Some(name);
            }
            None => log.say(format!("ignoring invalid hostname '{h}'")),
        }
    }

    // The instance is recorded before user-data runs: a script that reboots or hangs the
    // machine must not run again on the next boot.
    ensure_dir(&state, 0o700)?;
    write_atomic(&id_file, format!("{id}\n").as_bytes(), 0o600)?;
    write_atomic(
        &state.join("source"),
        format!("{}\n", data.source).as_bytes(),
        0o600,
    )?;
    let status_file = state.join("userdata-status");

    rep.user_data = match &data.user_data {
        None => {
            log.say("no user-data");
            UserDataOutcome::None
        }
        Some(raw) => {
            let ud = maybe_gunzip(raw)?;
            if ud.starts_with(b"#!") {
                run_user_data(opts, &state, &ud, &id, data.source, &mut log)?
            } else {
                log.say(format!(
                    "user-data ({} bytes) does not start with #!: ignored",
                    ud.len()
                ));
                UserDataOutcome::NotScript
            }
        }
    };
    write_atomic(
        &status_file,
        format!("{}\n", rep.user_data).as_bytes(),
        0o600,
    )?;
    if rep.user_data != UserDataOutcome::None {
        log.say(format!("user-data: {}", rep.user_data));
    }
    Ok(rep)
}

// ---------------------------------------------------------------- CLI

/// `cps context apply` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    /// `auto` or a comma-separated list of configdrive, opennebula, ec2, openstack (tried in order).
    #[arg(long, default_value = "auto")]
    pub sources: String,
    /// Where the instance id and the user-data status are kept.
    #[arg(long, default_value = "/var/lib/cps/context")]
    pub state_dir: PathBuf,
    /// Metadata service base URL (EC2 and OpenStack).
    #[arg(long, default_value = "http://169.254.169.254")]
    pub metadata_url: String,
    /// Prefix for every file written (the kernel host name is set only when this is `/`).
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Config drive device or image (default: the device labelled config-2).
    #[arg(long)]
    pub config_drive: Option<PathBuf>,
    /// OpenNebula context device or image (default: the device labelled CONTEXT).
    #[arg(long)]
    pub context_cd: Option<PathBuf>,
    /// Seconds the user-data script may run before its process group is killed.
    #[arg(long, default_value_t = 600)]
    pub userdata_timeout: u64,
    /// Seconds to keep retrying while no metadata service answers at all.
    #[arg(long, default_value_t = 60)]
    pub network_wait: u64,
}

impl ApplyArgs {
    pub fn options(&self) -> Result<ApplyOptions, BootCtxError> {
        Ok(ApplyOptions {
            sources: parse_sources(&self.sources)?,
            state_dir: self.state_dir.clone(),
            metadata_url: self.metadata_url.clone(),
            root: self.root.clone(),
            config_drive: self.config_drive.clone(),
            context_cd: self.context_cd.clone(),
            userdata_timeout: Duration::from_secs(self.userdata_timeout),
            network_wait: Duration::from_secs(self.network_wait),
            ..ApplyOptions::default()
        })
    }
}

/// Runs `cps context apply`. Exit codes: 0 done (also: no data, or already applied),
/// 1 error, 2 the user-data script failed or timed out.
pub fn run_cli(a: &ApplyArgs) -> ExitCode {
    let r = a.options().and_then(|o| apply(&o));
    match r {
        Ok(rep) if rep.user_data.failed() => ExitCode::from(2),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cps context: error: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        assert_eq!(parse_sources("auto").unwrap(), SourceKind::AUTO.to_vec());
        assert_eq!(
            parse_sources("ec2, configdrive,ec2").unwrap(),
            vec![SourceKind::Ec2, SourceKind::ConfigDrive]
        );
        assert!(parse_sources("azure").is_err());
        assert!(parse_sources("").is_err());
    }

    #[test]
    fn hostnames() {
        assert_eq!(
            sanitize_hostname("node-1.example.org.").as_deref(),
            Some("node-1.example.org")
        );
        let long = format!("{}.example.org", "a".repeat(60));
        assert_eq!(sanitize_hostname(&long), Some("a".repeat(60)));
        assert_eq!(sanitize_hostname("bad name"), None);
        assert_eq!(sanitize_hostname("-x"), None);
    }

    #[test]
    fn rooted_paths() {
        assert_eq!(
            rooted(Path::new("/tmp/r"), Path::new("/etc/hostname")),
            PathBuf::from("/tmp/r/etc/hostname")
        );
        assert_eq!(
            rooted(Path::new("/"), Path::new("/etc/hostname")),
            PathBuf::from("/etc/hostname")
        );
    }
}
