//! `mkimage service new NAME`: a new ConPaaS service from the blueprint templates in
//! `recipes/blueprint/` (the counterpart of the original `create-new-service-from-blueprints.sh`).
//!
//! Writes the image recipe, the agent and manager config annexes, the runtime module (agent and
//! manager halves with one example method each) and its test, with the name in lower, Mixed and
//! UPPER case; then registers the service by inserting one line above each marker:
//! `BLUEPRINT_INSERT_SERVICE` in `runtime/src/services/mod.rs` (the runtime's registry),
//! `BLUEPRINT_INSERT_RECIPE` in `mkimage/src/service.rs` (the built-in recipes). Nothing is written unless every check
//! passed (valid name, no such service yet, templates and markers present).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Names a service may not take: Rust keywords, module, file and crate names the runtime
/// uses (a module named like a crate the registry refers to would shadow it).
#[rustfmt::skip]
const RESERVED: &[&str] = &[
    // Rust keywords and reserved words
    "as", "async", "await", "box", "crate", "const", "do", "dyn", "else", "enum", "extern",
    "false", "final", "fn", "for", "gen", "if", "impl", "in", "let", "loop", "macro", "match",
    "mod", "move", "override", "priv", "pub", "ref", "return", "self", "static", "struct",
    "super", "trait", "true", "try", "type", "typeof", "union", "unsafe", "unsized", "use",
    "virtual", "where", "while", "yield", "abstract", "become", "core", "std", "alloc",
    // names taken in the runtime and the config tree
    "default", "blueprint", "archive", "services", "manager", "agent", "common", "test",
    "tests",
    // crates the registry module and the generated code name
    "anyhow", "thiserror", "tracing", "serde", "tokio", "nix", "hex", "base64", "axum",
    "hyper", "bytes", "rustls", "ring", "time", "tera", "url", "tar", "zip", "flate2", "clap",
    "rcgen", "proptest", "tempfile", "runtime", "mkimage", "register",
];

/// The three spellings of a service name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub lc: String,
    pub mc: String,
    pub uc: String,
}

/// Checks `name` (`[A-Za-z][A-Za-z0-9]*`, at most 32 characters) and spells it three ways:
/// `fooBar` → `foobar`, `FooBar`, `FOOBAR`.
pub fn names(name: &str) -> Result<Names> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric());
    let first_letter = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if name.is_empty() || name.len() > 32 || !ok_chars || !first_letter {
        bail!(
            "invalid service name '{name}': use 1 to 32 ASCII letters and digits, starting with a letter (e.g. `demo`, `fooBar`)"
        );
    }
    let lc = name.to_ascii_lowercase();
    if RESERVED.contains(&lc.as_str()) {
        bail!("invalid service name '{name}': '{lc}' is reserved");
    }
    let mut mc = String::new();
    for (i, c) in name.chars().enumerate() {
        mc.push(if i == 0 { c.to_ascii_uppercase() } else { c });
    }
    Ok(Names {
        uc: name.to_ascii_uppercase(),
        lc,
        mc,
    })
}

/// The workspace containing `start`: the nearest ancestor with a `Cargo.toml` declaring
/// `[workspace]` and the runtime's service registry.
pub fn find_workspace(start: &Path) -> Result<PathBuf> {
    let start = start
        .canonicalize()
        .with_context(|| format!("reading {}", start.display()))?;
    for d in start.ancestors() {
        let toml = d.join("Cargo.toml");
        if toml.is_file()
            && std::fs::read_to_string(&toml)
                .map(|t| t.contains("[workspace]"))
                .unwrap_or(false)
            && d.join(REGISTRY).is_file()
        {
            return Ok(d.to_path_buf());
        }
    }
    bail!(
        "no mkimage workspace (Cargo.toml with [workspace] and {REGISTRY}) in {} or above; use --workspace DIR",
        start.display()
    )
}

const REGISTRY: &str = "runtime/src/services/mod.rs";
const RECIPES: &str = "mkimage/src/service.rs";
const BLUEPRINT: &str = "recipes/blueprint";

/// (template in `recipes/blueprint/`, output path with `NAME`).
const FILES: &[(&str, &str)] = &[
    ("recipe.toml", "recipes/NAME.toml"),
    ("agent.cfg", "config/agent/NAME-agent.cfg"),
    ("manager.cfg", "config/manager/NAME-manager.cfg"),
    ("service.rs", "runtime/src/services/NAME.rs"),
    ("test.rs", "runtime/tests/service_NAME.rs"),
];

/// What `new_service` did.
#[derive(Debug)]
pub struct Created {
    pub names: Names,
    /// Files written, relative to the workspace.
    pub files: Vec<String>,
    /// Files edited (registration lines), relative to the workspace.
    pub registered: Vec<String>,
}

/// Inserts `line` (indented like the marker) above the marker line: the first line that is
/// a `// MARKER …` comment (mentions of the marker elsewhere do not count).
fn insert_above(text: &str, marker: &str, line: &str, file: &str) -> Result<String> {
    let mut out = String::with_capacity(text.len() + line.len() + 8);
    let mut found = false;
    let comment = format!("// {marker}");
    for l in text.split_inclusive('\n') {
        if !found && l.trim_start().starts_with(&comment) {
            let indent: String = l.chars().take_while(|c| c.is_whitespace()).collect();
            out.push_str(&indent);
            out.push_str(line);
            out.push('\n');
            found = true;
        }
        out.push_str(l);
    }
    if !found {
        bail!("{file} has no line with the marker {marker}; cannot register the service");
    }
    Ok(out)
}

/// Creates service `name` in workspace `ws`.
pub fn new_service(ws: &Path, name: &str, description: Option<&str>) -> Result<Created> {
    let n = names(name)?;
    let description = description
        .map(str::to_string)
        .unwrap_or_else(|| format!("the {} service", n.mc));
    if description.contains(['"', '\\', '\n']) {
        bail!("the description may not contain quotes, backslashes or newlines");
    }
    // Everything is checked and rendered before anything is written.
    let registry_path = ws.join(REGISTRY);
    let recipes_path = ws.join(RECIPES);
    let registry = std::fs::read_to_string(&registry_path)
        .with_context(|| format!("reading {}", registry_path.display()))?;
    let recipes = std::fs::read_to_string(&recipes_path)
        .with_context(|| format!("reading {}", recipes_path.display()))?;
    let svc_line = format!("{},", n.lc);
    let recipe_line = format!("(\"{0}\", include_str!(\"../../recipes/{0}.toml\")),", n.lc);
    if registry.lines().any(|l| l.trim() == svc_line) {
        bail!(
            "service '{}' exists already (registered in {REGISTRY})",
            n.lc
        );
    }
    if recipes.contains(&format!("(\"{}\",", n.lc)) {
        bail!(
            "service '{}' exists already (built-in recipe in {RECIPES})",
            n.lc
        );
    }
    let mut outputs = Vec::new();
    for (_, out) in FILES {
        let rel = out.replace("NAME", &n.lc);
        if ws.join(&rel).exists() {
            bail!("service '{}' exists already: {rel} is there", n.lc);
        }
        outputs.push(rel);
    }
    let mut ctx = tera::Context::new();
    ctx.insert("lc_name", &n.lc);
    ctx.insert("mc_name", &n.mc);
    ctx.insert("uc_name", &n.uc);
    ctx.insert("description", &description);
    let mut rendered = Vec::new();
    for ((tpl, _), rel) in FILES.iter().zip(&outputs) {
        let p = ws.join(BLUEPRINT).join(tpl);
        let t = std::fs::read_to_string(&p)
            .with_context(|| format!("reading the blueprint template {}", p.display()))?;
        let text = tera::Tera::one_off(&t, &ctx, false).map_err(|e| {
            let mut msg = format!("rendering {}: {e}", p.display());
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            anyhow::anyhow!(msg)
        })?;
        rendered.push((rel.clone(), text));
    }
    let registry = insert_above(&registry, "BLUEPRINT_INSERT_SERVICE", &svc_line, REGISTRY)?;
    let recipes = insert_above(&recipes, "BLUEPRINT_INSERT_RECIPE", &recipe_line, RECIPES)?;

    for (rel, text) in &rendered {
        let p = ws.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        // create_new: never overwrite, even if something appeared meanwhile
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .with_context(|| format!("creating {}", p.display()))?;
        f.write_all(text.as_bytes())?;
    }
    std::fs::write(&registry_path, registry)?;
    std::fs::write(&recipes_path, recipes)?;
    Ok(Created {
        names: n,
        files: outputs,
        registered: vec![REGISTRY.to_string(), RECIPES.to_string()],
    })
}

/// What to do next, for the terminal.
pub fn next_steps(c: &Created) -> String {
    let Names { lc, mc, uc } = &c.names;
    let mut s = format!("Created the {mc} service ({lc}):\n");
    for f in &c.files {
        s.push_str(&format!("  new     {f}\n"));
    }
    for f in &c.registered {
        s.push_str(&format!("  edited  {f} (registration)\n"));
    }
    s.push_str(&format!(
        "\nNext:\n\
         \x20 1. runtime/src/services/{lc}.rs: replace the example methods get_{lc} (agent and\n\
         \x20    manager) and the node hooks with the service's own.\n\
         \x20 2. config/agent/{lc}-agent.cfg, config/manager/{lc}-manager.cfg: its settings\n\
         \x20    ({uc}_MESSAGE is the example, handed from the manager to the agents).\n\
         \x20 3. recipes/{lc}.toml: the Debian packages, files and units its image needs.\n\
         \x20 4. cargo test -p runtime --test service_{lc}\n\
         \x20 5. mkimage build --services {lc} -o out/   (as root)\n"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_spelled_three_ways() {
        assert_eq!(
            names("demo").unwrap(),
            Names {
                lc: "demo".into(),
                mc: "Demo".into(),
                uc: "DEMO".into()
            }
        );
        assert_eq!(names("fooBar").unwrap().mc, "FooBar");
        assert_eq!(names("FooBar2").unwrap().lc, "foobar2");
        for bad in [
            "", "9lives", "foo-bar", "foo_bar", "a b", "../x", "été", "default", "Mod",
        ] {
            let e = names(bad).unwrap_err().to_string();
            assert!(e.contains("invalid service name"), "{bad}: {e}");
        }
        assert!(names(&"a".repeat(33)).is_err());
    }

    #[test]
    fn insertion_keeps_the_marker_and_its_indent() {
        let t = "//! the `BLUEPRINT_INSERT_X` marker\na\n    // BLUEPRINT_INSERT_X (keep)\n];\n";
        assert_eq!(
            insert_above(t, "BLUEPRINT_INSERT_X", "x,", "f").unwrap(),
            "//! the `BLUEPRINT_INSERT_X` marker\na\n    x,\n    // BLUEPRINT_INSERT_X (keep)\n];\n"
        );
        assert!(insert_above("a\n", "BLUEPRINT_INSERT_X", "x", "f")
            .unwrap_err()
            .to_string()
            .contains("no line with the marker BLUEPRINT_INSERT_X"));
    }
}
