//! Cloud cfg files (`config/cloud/ec2.cfg`, `config/cloud/openstack.cfg`): the settings of
//! the `ec2` and `openstack` drivers, read with the original's key names.
//!
//! A cloud cfg file is INI. The cloud's settings are in the section `[iaas]` (the original's
//! files), or in the section named like the cloud, or in the file's only section. `DRIVER`
//! (`EC2`, `OPENSTACK`, any case) says which driver the section is for.
//!
//! Keys have aliases: the original name first (`USER`, `PASSWORD`, `IMAGE_ID`, `SIZE_ID`, …),
//! then the names of `clouds-template.cfg` (`EC2_USER`, …) and plainer spellings
//! (`ACCESS_KEY_ID`, `INSTANCE_TYPE`, `FLAVOR`, …). Errors name the file, the line and the key.
//!
//! This module only parses; the drivers themselves are behind the `clouds` feature.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::config::Ini;

/// Which driver a cloud cfg section is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    Ec2,
    OpenStack,
}

impl DriverKind {
    pub fn parse(s: &str) -> Option<DriverKind> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ec2" | "aws" => Some(DriverKind::Ec2),
            "openstack" => Some(DriverKind::OpenStack),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Ec2 => "ec2",
            DriverKind::OpenStack => "openstack",
        }
    }
}

/// Settings of one `ec2` cloud.
#[derive(Clone, PartialEq, Eq)]
pub struct Ec2Settings {
    /// Where they came from (`file:line` of the section), for messages.
    pub source: String,
    /// Access key id (`USER`); with `secret_key`, else the AWS credential chain is used.
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    pub region: String,
    /// Custom endpoint URL (tests: a local emulator).
    pub endpoint: Option<String>,
    pub image_id: String,
    pub instance_type: String,
    /// Security group names (EC2-Classic / default VPC).
    pub security_groups: Vec<String>,
    /// Security group ids (`sg-…`; needed with a subnet).
    pub security_group_ids: Vec<String>,
    pub subnet_id: Option<String>,
    pub key_name: Option<String>,
    /// Address the manager uses to reach the nodes: private instead of public.
    pub use_private_ip: bool,
    /// How long to wait for a node to run and have an address.
    pub address_timeout: Duration,
    pub poll: Duration,
}

impl std::fmt::Debug for Ec2Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Settings")
            .field("source", &self.source)
            .field("access_key", &self.access_key)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("image_id", &self.image_id)
            .field("instance_type", &self.instance_type)
            .field("security_groups", &self.security_groups)
            .field("security_group_ids", &self.security_group_ids)
            .field("subnet_id", &self.subnet_id)
            .field("key_name", &self.key_name)
            .field("use_private_ip", &self.use_private_ip)
            .finish_non_exhaustive()
    }
}

/// Settings of one `openstack` cloud.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenStackSettings {
    pub source: String,
    /// Keystone v3 URL, ending in `/v3`.
    pub auth_url: String,
    pub user: String,
    pub password: String,
    pub project: String,
    pub user_domain: String,
    pub project_domain: String,
    /// Catalog region; any when unset.
    pub region: Option<String>,
    /// Catalog interface (`public`).
    pub interface: String,
    pub image_id: String,
    /// Flavor id or name.
    pub flavor: String,
    pub network_id: Option<String>,
    pub key_name: Option<String>,
    pub security_groups: Vec<String>,
    pub config_drive: bool,
    pub use_private_ip: bool,
    pub address_timeout: Duration,
    pub poll: Duration,
}

impl std::fmt::Debug for OpenStackSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenStackSettings")
            .field("source", &self.source)
            .field("auth_url", &self.auth_url)
            .field("user", &self.user)
            .field("project", &self.project)
            .field("user_domain", &self.user_domain)
            .field("project_domain", &self.project_domain)
            .field("region", &self.region)
            .field("image_id", &self.image_id)
            .field("flavor", &self.flavor)
            .field("network_id", &self.network_id)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloudSettings {
    Ec2(Ec2Settings),
    OpenStack(OpenStackSettings),
}

impl CloudSettings {
    pub fn kind(&self) -> DriverKind {
        match self {
            CloudSettings::Ec2(_) => DriverKind::Ec2,
            CloudSettings::OpenStack(_) => DriverKind::OpenStack,
        }
    }
}

/// One section of a cloud cfg file, with lookups that know the aliases and report
/// `file:line` in errors.
struct Section<'a> {
    ini: &'a Ini,
    file: String,
    name: String,
}

impl Section<'_> {
    fn header_line(&self) -> usize {
        self.ini.section_line(&self.name).unwrap_or(0)
    }

    /// The first alias present and non-empty: (key, value).
    fn find(&self, keys: &[&str]) -> Option<(String, String)> {
        keys.iter().find_map(|k| {
            self.ini
                .get(&self.name, k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .map(|v| (k.to_string(), v))
        })
    }

    fn opt(&self, keys: &[&str]) -> Option<String> {
        self.find(keys).map(|(_, v)| v)
    }

    fn req(&self, keys: &[&str]) -> Result<String> {
        match self.find(keys) {
            Some((_, v)) => Ok(v),
            None => {
                let also = if keys.len() > 1 {
                    format!(" (also accepted: {})", keys[1..].join(", "))
                } else {
                    String::new()
                };
                // An empty value: point at its line; else at the section header.
                let line = keys
                    .iter()
                    .find_map(|k| self.ini.key_line(&self.name, k))
                    .unwrap_or_else(|| self.header_line());
                bail!(
                    "{}:{line}: missing or empty {} in section [{}]{also}",
                    self.file,
                    keys[0],
                    self.name
                )
            }
        }
    }

    fn bad(&self, key: &str, value: &str, why: impl std::fmt::Display) -> anyhow::Error {
        let line = self
            .ini
            .key_line(&self.name, key)
            .unwrap_or_else(|| self.header_line());
        anyhow::anyhow!("{}:{line}: {key} = '{value}': {why}", self.file)
    }

    fn bool(&self, keys: &[&str], default: bool) -> Result<bool> {
        match self.find(keys) {
            None => Ok(default),
            Some((k, v)) => match v.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Ok(true),
                "false" | "no" | "off" | "0" => Ok(false),
                _ => Err(self.bad(&k, &v, "expected true or false")),
            },
        }
    }

    fn secs(&self, keys: &[&str], default: f64) -> Result<Duration> {
        match self.find(keys) {
            None => Ok(Duration::from_secs_f64(default)),
            Some((k, v)) => v
                .parse::<f64>()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| self.bad(&k, &v, "expected a number of seconds")),
        }
    }

    fn list(&self, keys: &[&str]) -> Vec<String> {
        self.opt(keys)
            .map(|v| {
                v.split([',', ' ', '\n'])
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn source(&self) -> String {
        format!("{}:{}", self.file, self.header_line())
    }
}

/// `REGION` as the original wrote it (`ec2.us-west-2.amazonaws.com`) or plain (`us-west-2`).
pub fn ec2_region(value: &str) -> String {
    let v = value.trim();
    let host = v
        .strip_prefix("https://")
        .or_else(|| v.strip_prefix("http://"))
        .unwrap_or(v)
        .trim_end_matches('/');
    match host.strip_prefix("ec2.") {
        Some(rest) => rest.split('.').next().unwrap_or(rest).to_string(),
        None => host.to_string(),
    }
}

fn parse_ec2(s: &Section) -> Result<Ec2Settings> {
    let region_raw = s.req(&["REGION", "EC2_REGION", "AWS_REGION"])?;
    let mut groups = s.list(&[
        "SECURITY_GROUP_NAME",
        "EC2_SECURITY_GROUP_NAME",
        "SECURITY_GROUP",
    ]);
    // An id given where the original wanted a name: sort it to the ids.
    let mut group_ids = s.list(&["SECURITY_GROUP_ID", "SECURITY_GROUP_IDS"]);
    group_ids.extend(groups.iter().filter(|g| g.starts_with("sg-")).cloned());
    groups.retain(|g| !g.starts_with("sg-"));
    let access_key = s.opt(&["USER", "USERNAME", "EC2_USER", "ACCESS_KEY_ID"]);
    let secret_key = s.opt(&["PASSWORD", "EC2_PASSWORD", "SECRET_ACCESS_KEY"]);
    if access_key.is_some() != secret_key.is_some() {
        let (have, missing) = if access_key.is_some() {
            ("USER", "PASSWORD")
        } else {
            ("PASSWORD", "USER")
        };
        bail!(
            "{}: {have} is set but {missing} is not (both, or neither to use the AWS credential chain)",
            s.source()
        );
    }
    Ok(Ec2Settings {
        source: s.source(),
        access_key,
        secret_key,
        region: ec2_region(&region_raw),
        endpoint: s.opt(&["ENDPOINT", "ENDPOINT_URL", "EC2_URL"]),
        image_id: s.req(&["IMAGE_ID", "EC2_IMAGE_ID", "AMI"])?,
        instance_type: s.req(&[
            "SIZE_ID",
            "EC2_SIZE_ID",
            "SIZE",
            "INSTANCE_TYPE",
            "INST_TYPE",
        ])?,
        security_groups: groups,
        security_group_ids: group_ids,
        subnet_id: s.opt(&["SUBNET_ID", "SUBNET"]),
        key_name: s.opt(&["KEY_NAME", "EC2_KEY_NAME"]),
        use_private_ip: s.bool(&["USE_PRIVATE_IP"], false)?,
        address_timeout: s.secs(&["ADDRESS_TIMEOUT"], 300.0)?,
        poll: s.secs(&["POLL_INTERVAL"], 2.0)?,
    })
}

/// `AUTH_URL` as given (with `/v3` added when it names no version), or the original's
/// `HOST` (`http://HOST:5000/v3`).
fn keystone_url(s: &Section) -> Result<String> {
    if let Some(u) = s.opt(&["AUTH_URL", "OS_AUTH_URL", "OPENSTACK_AUTH_URL"]) {
        let u = u.trim_end_matches('/');
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            return Err(s.bad("AUTH_URL", u, "expected an http:// or https:// URL"));
        }
        return Ok(if u.ends_with("/v3") {
            u.to_string()
        } else if u.ends_with("/v2.0") {
            format!("{}/v3", u.trim_end_matches("/v2.0"))
        } else {
            format!("{u}/v3")
        });
    }
    match s.find(&["HOST", "OPENSTACK_HOST"]) {
        Some((_, h)) => Ok(format!("http://{h}:5000/v3")),
        None => Err(s
            .req(&["AUTH_URL", "HOST", "OS_AUTH_URL"])
            .expect_err("neither AUTH_URL nor HOST is set")),
    }
}

fn parse_openstack(s: &Section) -> Result<OpenStackSettings> {
    let user = s.req(&["USER", "USERNAME", "OPENSTACK_USER", "OS_USERNAME"])?;
    let domain = s.opt(&["DOMAIN", "DOMAIN_NAME"]);
    let dom = |keys: &[&str]| {
        s.opt(keys)
            .or_else(|| domain.clone())
            .unwrap_or_else(|| "Default".to_string())
    };
    Ok(OpenStackSettings {
        source: s.source(),
        auth_url: keystone_url(s)?,
        password: s.req(&["PASSWORD", "OPENSTACK_PASSWORD", "OS_PASSWORD"])?,
        // The original scoped to a tenant named like the user.
        project: s
            .opt(&[
                "PROJECT",
                "PROJECT_NAME",
                "TENANT",
                "TENANT_NAME",
                "OS_PROJECT_NAME",
            ])
            .unwrap_or_else(|| user.clone()),
        user_domain: dom(&["USER_DOMAIN", "USER_DOMAIN_NAME", "OS_USER_DOMAIN_NAME"]),
        project_domain: dom(&[
            "PROJECT_DOMAIN",
            "PROJECT_DOMAIN_NAME",
            "OS_PROJECT_DOMAIN_NAME",
        ]),
        user,
        region: s.opt(&["REGION", "REGION_NAME", "OS_REGION_NAME"]),
        interface: s
            .opt(&["INTERFACE", "ENDPOINT_TYPE"])
            .unwrap_or_else(|| "public".into())
            .trim_end_matches("URL")
            .to_ascii_lowercase(),
        image_id: s.req(&["IMAGE_ID", "OPENSTACK_IMAGE_ID", "IMAGE"])?,
        flavor: s.req(&[
            "SIZE_ID",
            "OPENSTACK_SIZE_ID",
            "FLAVOR",
            "FLAVOR_ID",
            "INST_TYPE",
        ])?,
        network_id: s.opt(&["NETWORK_ID", "OPENSTACK_NETWORK_ID", "NETWORK"]),
        key_name: s.opt(&["KEY_NAME", "OPENSTACK_KEY_NAME"]),
        security_groups: s.list(&["SECURITY_GROUP_NAME", "OPENSTACK_SECURITY_GROUP_NAME"]),
        config_drive: s.bool(&["CONFIG_DRIVE"], true)?,
        use_private_ip: s.bool(&["USE_PRIVATE_IP"], false)?,
        address_timeout: s.secs(&["ADDRESS_TIMEOUT"], 300.0)?,
        poll: s.secs(&["POLL_INTERVAL"], 2.0)?,
    })
}

/// Reads the settings of cloud `cloud` from `text` (the content of `file`). `expect`: the
/// driver the caller wants (`CLOUD = ec2`); the section's `DRIVER` must agree with it, and
/// one of the two must be given.
pub fn parse_cloud(
    text: &str,
    file: &str,
    cloud: &str,
    expect: Option<DriverKind>,
) -> Result<CloudSettings> {
    let ini = Ini::parse(text).map_err(|e| anyhow::anyhow!("{file}: {e:#}"))?;
    let sections = ini.sections();
    let name = if ini.has_section("iaas") {
        "iaas".to_string()
    } else if ini.has_section(cloud) {
        cloud.to_string()
    } else if sections.len() == 1 {
        sections[0].clone()
    } else if sections.is_empty() {
        bail!("{file}: no section (expected [iaas])");
    } else {
        bail!(
            "{file}: sections {} but none is [iaas] or [{cloud}]",
            sections
                .iter()
                .map(|s| format!("[{s}]"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let s = Section {
        ini: &ini,
        file: file.to_string(),
        name,
    };
    let kind = match (s.find(&["DRIVER"]), expect) {
        (None, Some(k)) => k,
        (None, None) => return Err(s.req(&["DRIVER"]).expect_err("DRIVER is not set")),
        (Some((_, v)), expect) => {
            let Some(k) = DriverKind::parse(&v) else {
                return Err(s.bad("DRIVER", &v, "expected EC2 or OPENSTACK"));
            };
            if let Some(e) = expect {
                if e != k {
                    return Err(s.bad(
                        "DRIVER",
                        &v,
                        format!("the manager config asks for a {} cloud", e.as_str()),
                    ));
                }
            }
            k
        }
    };
    Ok(match kind {
        DriverKind::Ec2 => CloudSettings::Ec2(parse_ec2(&s)?),
        DriverKind::OpenStack => CloudSettings::OpenStack(parse_openstack(&s)?),
    })
}

/// [`parse_cloud`] on a file.
pub fn load_cloud(path: &Path, cloud: &str, expect: Option<DriverKind>) -> Result<CloudSettings> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cloud cfg {}: {e}", path.display()))?;
    parse_cloud(&text, &path.display().to_string(), cloud, expect)
}

/// Where a cloud comes from, as the manager config says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloudSource {
    /// Agents as local processes.
    Local,
    /// VMs under QEMU on this host (the manager config's `[qemu]` section).
    Qemu,
    /// Containers under systemd-nspawn on a root tree (`NSPAWN_ROOTFS`), as in a Nutshell.
    Nspawn,
    /// A cloud cfg file (`ec2`, `openstack`); `driver` when the manager config names it.
    File {
        path: PathBuf,
        driver: Option<DriverKind>,
    },
}

/// One cloud the manager may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudEntry {
    /// Node id prefix; what `add_nodes(cloud=…)` names.
    pub name: String,
    pub source: CloudSource,
}

/// Is `name` usable as a cloud name (node id prefix)?
pub fn valid_cloud_name(name: &str) -> bool {
    !name.is_empty()
        && name != "default"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A relative cloud cfg path is relative to the config tree (`cloud/ec2.cfg`).
pub fn resolve(path: &Path, config_dir: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        config_dir.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EC2_ORIGINAL: &str = "[iaas]\n\nDRIVER = EC2\n\n# comment\nUSER = AKIDEXAMPLE\n\
PASSWORD = secretkey\nIMAGE_ID = ami-4dac7f24\nSIZE_ID = t1.micro\n\
SECURITY_GROUP_NAME = contrail\nKEY_NAME = conpaas\nREGION = ec2.eu-west-1.amazonaws.com\n";

    #[test]
    fn original_ec2_cfg_is_accepted() {
        let c = parse_cloud(EC2_ORIGINAL, "ec2.cfg", "iaas", None).unwrap();
        let CloudSettings::Ec2(e) = c else {
            panic!("not ec2: {c:?}")
        };
        assert_eq!(e.access_key.as_deref(), Some("AKIDEXAMPLE"));
        assert_eq!(e.secret_key.as_deref(), Some("secretkey"));
        assert_eq!(e.image_id, "ami-4dac7f24");
        assert_eq!(e.instance_type, "t1.micro");
        assert_eq!(e.security_groups, vec!["contrail"]);
        assert!(e.security_group_ids.is_empty());
        assert_eq!(e.key_name.as_deref(), Some("conpaas"));
        assert_eq!(e.region, "eu-west-1");
        assert_eq!(e.source, "ec2.cfg:1");
        assert!(!format!("{e:?}").contains("secretkey"));
    }

    #[test]
    fn template_and_plain_key_names_are_accepted() {
        let t = "[ec2-1]\nDRIVER = ec2\nEC2_USER = a\nEC2_PASSWORD = b\nEC2_IMAGE_ID = ami-1\n\
                 EC2_SIZE_ID = m1.small\nEC2_SECURITY_GROUP_NAME = sg-123, web\nREGION = us-east-1\n\
                 SUBNET_ID = subnet-9\nENDPOINT = http://127.0.0.1:5000\n";
        let CloudSettings::Ec2(e) = parse_cloud(t, "x.cfg", "ec2-1", None).unwrap() else {
            panic!()
        };
        assert_eq!(e.security_groups, vec!["web"]);
        assert_eq!(e.security_group_ids, vec!["sg-123"]);
        assert_eq!(e.subnet_id.as_deref(), Some("subnet-9"));
        assert_eq!(e.endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        let plain = "[c]\nACCESS_KEY_ID = a\nSECRET_ACCESS_KEY = b\nAMI = ami-2\n\
                     INSTANCE_TYPE = t3.micro\nREGION = us-west-2\n";
        let CloudSettings::Ec2(e) =
            parse_cloud(plain, "p.cfg", "c", Some(DriverKind::Ec2)).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (e.image_id.as_str(), e.instance_type.as_str()),
            ("ami-2", "t3.micro")
        );
    }

    #[test]
    fn missing_key_names_file_line_and_key() {
        let t = "# ec2\n\n[iaas]\nDRIVER = EC2\nSIZE_ID = t1.micro\nREGION = us-east-1\n";
        let e = parse_cloud(t, "/etc/cps/ec2.cfg", "iaas", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/cps/ec2.cfg:3:") && e.contains("IMAGE_ID") && e.contains("[iaas]"),
            "{e}"
        );
        // An empty value points at its own line.
        let t = "[iaas]\nDRIVER = EC2\nIMAGE_ID =\nSIZE_ID = t1.micro\nREGION = us-east-1\n";
        let e = parse_cloud(t, "ec2.cfg", "iaas", None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ec2.cfg:3: missing or empty IMAGE_ID"), "{e}");
        // Only half of the credentials.
        let t = "[iaas]\nDRIVER = EC2\nUSER = a\nIMAGE_ID = i\nSIZE_ID = s\nREGION = r\n";
        let e = parse_cloud(t, "ec2.cfg", "iaas", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ec2.cfg:1") && e.contains("PASSWORD"), "{e}");
        // No driver anywhere.
        let e = parse_cloud("[iaas]\nUSER = a\n", "c.cfg", "iaas", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.cfg:1") && e.contains("DRIVER"), "{e}");
        // A driver the manager did not ask for.
        let e = parse_cloud(EC2_ORIGINAL, "ec2.cfg", "iaas", Some(DriverKind::OpenStack))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ec2.cfg:3: DRIVER = 'EC2'"), "{e}");
        let e = parse_cloud("[iaas]\nDRIVER = nebula\n", "c.cfg", "iaas", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.cfg:2: DRIVER = 'nebula'"), "{e}");
        let e = parse_cloud("[a]\nDRIVER=EC2\n[b]\nDRIVER=EC2\n", "m.cfg", "c", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.cfg") && e.contains("[iaas] or [c]"), "{e}");
        let e = parse_cloud(
            "[iaas]\nDRIVER=openstack\nUSER=u\nPASSWORD=p\nHOST=h\nIMAGE_ID=i\nSIZE_ID=s\nUSE_PRIVATE_IP = maybe\n",
            "o.cfg",
            "iaas",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("o.cfg:8: USE_PRIVATE_IP = 'maybe'"), "{e}");
    }

    #[test]
    fn original_openstack_keys_are_accepted() {
        let t = "[iaas]\nDRIVER = OPENSTACK\nUSER = demo\nPASSWORD = pw\nHOST = 172.16.0.1\n\
                 IMAGE_ID = 0f1e\nSIZE_ID = m1.small\nKEY_NAME = test\n\
                 SECURITY_GROUP_NAME = default\nNETWORK_ID = net-1\n";
        let CloudSettings::OpenStack(o) = parse_cloud(t, "openstack.cfg", "iaas", None).unwrap()
        else {
            panic!()
        };
        assert_eq!(o.auth_url, "http://172.16.0.1:5000/v3");
        assert_eq!(o.user, "demo");
        assert_eq!(o.project, "demo", "the original's tenant is the user");
        assert_eq!(
            (o.user_domain.as_str(), o.project_domain.as_str()),
            ("Default", "Default")
        );
        assert_eq!(o.flavor, "m1.small");
        assert_eq!(o.image_id, "0f1e");
        assert_eq!(o.network_id.as_deref(), Some("net-1"));
        assert_eq!(o.security_groups, vec!["default"]);
        assert_eq!(o.key_name.as_deref(), Some("test"));
        assert!(o.config_drive);
        assert_eq!(o.interface, "public");
        assert!(!format!("{o:?}").contains("pw"));

        let t = "[mystack]\nAUTH_URL = https://keystone.example:5000\nUSERNAME = u\nPASSWORD = p\n\
                 PROJECT = proj\nDOMAIN = corp\nPROJECT_DOMAIN = other\nFLAVOR = 42\nIMAGE = img\n\
                 REGION = R2\nINTERFACE = internalURL\n";
        let CloudSettings::OpenStack(o) =
            parse_cloud(t, "o.cfg", "mystack", Some(DriverKind::OpenStack)).unwrap()
        else {
            panic!()
        };
        assert_eq!(o.auth_url, "https://keystone.example:5000/v3");
        assert_eq!(
            (o.user_domain.as_str(), o.project_domain.as_str()),
            ("corp", "other")
        );
        assert_eq!((o.project.as_str(), o.flavor.as_str()), ("proj", "42"));
        assert_eq!(
            (o.region.as_deref(), o.interface.as_str()),
            (Some("R2"), "internal")
        );

        let e = parse_cloud(
            "[iaas]\nDRIVER = OPENSTACK\nUSER = u\nPASSWORD = p\nIMAGE_ID = i\nSIZE_ID = s\n",
            "openstack.cfg",
            "iaas",
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("openstack.cfg:1:") && e.contains("AUTH_URL"),
            "{e}"
        );
    }

    #[test]
    fn shipped_cloud_cfg_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/cloud");
        for (f, k) in [
            ("ec2.cfg", DriverKind::Ec2),
            ("openstack.cfg", DriverKind::OpenStack),
        ] {
            let c = load_cloud(&dir.join(f), "iaas", None).unwrap_or_else(|e| panic!("{f}: {e:#}"));
            assert_eq!(c.kind(), k);
        }
    }

    #[test]
    fn region_forms() {
        assert_eq!(ec2_region("ec2.us-west-2.amazonaws.com"), "us-west-2");
        assert_eq!(
            ec2_region("https://ec2.ap-southeast-2.amazonaws.com/"),
            "ap-southeast-2"
        );
        assert_eq!(ec2_region("eu-central-1"), "eu-central-1");
        assert!(valid_cloud_name("ec2-east_1"));
        assert!(!valid_cloud_name("default") && !valid_cloud_name("a b") && !valid_cloud_name(""));
    }
}
