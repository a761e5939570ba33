//! Service recipes (`recipes/<name>.toml`): what a ConPaaS service adds to an image —
//! Debian packages, extra apt repositories with their signing keys, files, units to
//! enable or disable, commands, and the packages pruning must keep.
//!
//! The recipes of the built-in services are compiled into the binary, so an
//! installed `mkimage` needs no source tree; `MKIMAGE_RECIPES_DIR` (or a
//! `recipes/` directory next to the workspace) can add or override services.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The recipes shipped with mkimage.
const BUILTIN: &[(&str, &str)] = &[
    ("helloworld", include_str!("../../recipes/helloworld.toml")),
    ("generic", include_str!("../../recipes/generic.toml")),
    ("php", include_str!("../../recipes/php.toml")),
    ("mysql", include_str!("../../recipes/mysql.toml")),
    ("selenium", include_str!("../../recipes/selenium.toml")),
    ("cds", include_str!("../../recipes/cds.toml")),
    ("scalaris", include_str!("../../recipes/scalaris.toml")),
    ("xtreemfs", include_str!("../../recipes/xtreemfs.toml")),
    ("condor", include_str!("../../recipes/condor.toml")),
    ("hadoop", include_str!("../../recipes/hadoop.toml")),
    // BLUEPRINT_INSERT_RECIPE (`mkimage service new` adds its recipe above this line)
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecipe {
    pub name: String,
    pub description: String,
    /// Debian packages installed with --no-install-recommends.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Extra apt repositories, each with the key that signs it.
    #[serde(default)]
    pub repositories: Vec<Repository>,
    /// Files written into the image.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// systemd units enabled at boot.
    #[serde(default)]
    pub enable: Vec<String>,
    /// systemd units disabled (the runtime starts them when the service needs them).
    #[serde(default)]
    pub disable: Vec<String>,
    /// Shell commands run inside the image after the install (`sh -e -c`).
    #[serde(default)]
    pub commands: Vec<String>,
    /// Packages pruning must keep besides `packages` (roots of the keep closure).
    #[serde(default)]
    pub keep: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    pub name: String,
    pub uri: String,
    pub suites: Vec<String>,
    #[serde(default)]
    pub components: Vec<String>,
    /// Where the repository's signing key is published; it is stored in the image
    /// and named by the sources entry's `Signed-By`.
    pub key_url: String,
    /// Keep the repository configured in the image after the install.
    #[serde(default)]
    pub keep: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub path: String,
    pub content: String,
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn default_mode() -> String {
    "0644".into()
}

#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ServiceError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

/// Directories searched for user recipes, before the built-in ones.
fn user_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("MKIMAGE_RECIPES_DIR") {
        v.push(PathBuf::from(d));
    }
    v
}

/// Parses a service recipe; errors carry the file and line.
pub fn parse(text: &str, file: &str) -> Result<ServiceRecipe, ServiceError> {
    toml::from_str::<ServiceRecipe>(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        ServiceError {
            file: file.to_owned(),
            line,
            message: e.message().to_owned(),
        }
    })
}

/// The recipe of service `name`, and the text it was read from.
pub fn load(name: &str) -> Result<(ServiceRecipe, String), ServiceError> {
    for d in user_dirs() {
        let p = d.join(format!("{name}.toml"));
        if p.exists() {
            let text = std::fs::read_to_string(&p).map_err(|e| ServiceError {
                file: p.display().to_string(),
                line: None,
                message: e.to_string(),
            })?;
            return Ok((parse(&text, &p.display().to_string())?, text));
        }
    }
    match BUILTIN.iter().find(|(n, _)| *n == name) {
        Some((_, text)) => Ok((
            parse(text, &format!("recipes/{name}.toml"))?,
            text.to_string(),
        )),
        None => Err(ServiceError {
            file: format!("recipes/{name}.toml"),
            line: None,
            message: format!(
                "no recipe for service `{name}` (built in: {})",
                BUILTIN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Names of the built-in services.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// The deb822 sources entry for a repository whose key is at `key_path` (in the image).
pub fn sources_entry(repo: &Repository, key_path: &str) -> String {
    let mut s = format!(
        "Types: deb\nURIs: {}\nSuites: {}\n",
        repo.uri,
        repo.suites.join(" ")
    );
    if !repo.components.is_empty() {
        s.push_str(&format!("Components: {}\n", repo.components.join(" ")));
    }
    s.push_str(&format!("Signed-By: {key_path}\n"));
    s
}

/// The URL whose answer proves the repository is reachable (its Release file).
pub fn release_url(repo: &Repository) -> String {
    let base = repo.uri.trim_end_matches('/');
    match repo.suites.first().map(String::as_str) {
        Some("./") | Some(".") | None => format!("{base}/Release"),
        Some(suite) => format!("{base}/dists/{suite}/Release"),
    }
}

/// Path of a recipe file in the source tree, for messages.
pub fn source_path(name: &str) -> PathBuf {
    Path::new("recipes").join(format!("{name}.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_recipe_parses_and_is_named_after_its_file() {
        for name in builtin_names() {
            let (r, _) = load(name).unwrap();
            assert_eq!(r.name, name);
        }
    }

    #[test]
    fn services_outside_debian_declare_their_repository() {
        for name in ["scalaris", "xtreemfs", "condor", "hadoop"] {
            let (r, _) = load(name).unwrap();
            assert!(!r.repositories.is_empty(), "{name}");
            assert!(
                r.repositories
                    .iter()
                    .all(|x| x.key_url.starts_with("https://")),
                "{name}"
            );
        }
        let (mysql, _) = load("mysql").unwrap();
        assert!(mysql.packages.iter().any(|p| p == "mariadb-server"));
    }

    #[test]
    fn unknown_keys_are_refused_with_a_line() {
        let e = parse(
            "name = \"x\"\ndescription = \"y\"\npackgaes = []\n",
            "r.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("packgaes"));
    }

    #[test]
    fn sources_entry_and_release_url() {
        let r = Repository {
            name: "a".into(),
            uri: "https://repo.example/debian/".into(),
            suites: vec!["./".into()],
            components: vec![],
            key_url: "https://repo.example/key".into(),
            keep: false,
        };
        assert_eq!(release_url(&r), "https://repo.example/debian/Release");
        let e = sources_entry(&r, "/usr/share/keyrings/a.asc");
        assert!(e.contains("Signed-By: /usr/share/keyrings/a.asc"));
        let r2 = Repository {
            suites: vec!["bookworm".into()],
            components: vec!["main".into()],
            ..r
        };
        assert_eq!(
            release_url(&r2),
            "https://repo.example/debian/dists/bookworm/Release"
        );
    }
}
