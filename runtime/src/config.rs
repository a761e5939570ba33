//! INI configuration files as read by the original (Python `ConfigParser`): `[section]`,
//! `KEY = value` or `KEY: value`, `#`/`;` comment lines, continuation lines, key names
//! case-insensitive, `%(KEY)s` interpolation from the same section or `[DEFAULT]`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

#[derive(Clone, Debug, Default)]
pub struct Ini {
    sections: BTreeMap<String, BTreeMap<String, String>>,
    /// 1-based line of every section header and key (`(section, "")` for the header).
    lines: BTreeMap<(String, String), usize>,
}

impl Ini {
    pub fn parse(text: &str) -> Result<Ini> {
        let mut ini = Ini::default();
        let mut current: Option<String> = None;
        let mut last_key: Option<String> = None;
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim_end();
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let (Some(s), Some(k)) = (&current, &last_key) {
                    let v = ini
                        .sections
                        .get_mut(s)
                        .and_then(|m| m.get_mut(k))
                        .expect("key exists");
                    v.push('\n');
                    v.push_str(trimmed);
                    continue;
                }
            }
            if let Some(rest) = trimmed.strip_prefix('[') {
                let Some(name) = rest.strip_suffix(']') else {
                    bail!("line {}: malformed section header '{trimmed}'", n + 1);
                };
                let name = name.trim().to_string();
                ini.sections.entry(name.clone()).or_default();
                ini.lines
                    .entry((name.clone(), String::new()))
                    .or_insert(n + 1);
                current = Some(name);
                last_key = None;
                continue;
            }
            let Some(section) = &current else {
                bail!("line {}: key outside of any section", n + 1);
            };
            let pos = trimmed.find(['=', ':']);
            let Some(pos) = pos else {
                bail!("line {}: expected 'KEY = value', got '{trimmed}'", n + 1);
            };
            let key = trimmed[..pos].trim().to_ascii_uppercase();
            if key.is_empty() {
                bail!("line {}: empty key", n + 1);
            }
            let value = trimmed[pos + 1..].trim().to_string();
            ini.sections
                .get_mut(section)
                .expect("section exists")
                .insert(key.clone(), value);
            ini.lines.insert((section.clone(), key.clone()), n + 1);
            last_key = Some(key);
        }
        Ok(ini)
    }

    pub fn load(path: &Path) -> Result<Ini> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ini::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn raw(&self, section: &str, key: &str) -> Option<&String> {
        let key = key.to_ascii_uppercase();
        self.sections
            .get(section)
            .and_then(|s| s.get(&key))
            .or_else(|| self.sections.get("DEFAULT").and_then(|s| s.get(&key)))
    }

    /// The interpolated value, if present.
    pub fn get(&self, section: &str, key: &str) -> Option<String> {
        let mut v = self.raw(section, key)?.clone();
        for _ in 0..10 {
            let Some(start) = v.find("%(") else { break };
            let Some(end) = v[start..].find(")s") else {
                break;
            };
            let name = &v[start + 2..start + end];
            let rep = self.raw(section, name).cloned().unwrap_or_default();
            v.replace_range(start..start + end + 2, &rep);
        }
        Some(v)
    }

    pub fn get_or(&self, section: &str, key: &str, default: &str) -> String {
        self.get(section, key)
            .unwrap_or_else(|| default.to_string())
    }

    /// A non-empty value or the original's error message.
    pub fn require(&self, section: &str, key: &str) -> Result<String> {
        match self.get(section, key) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => bail!("Missing configuration variable {key} in section [{section}]"),
        }
    }

    pub fn parse_or<T: std::str::FromStr>(&self, section: &str, key: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(section, key) {
            None => Ok(default),
            Some(v) if v.is_empty() => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|e| anyhow::anyhow!("[{section}] {key} = '{v}': {e}")),
        }
    }

    pub fn set(&mut self, section: &str, key: &str, value: &str) {
        self.sections
            .entry(section.to_string())
            .or_default()
            .insert(key.to_ascii_uppercase(), value.to_string());
    }

    /// Keys of `section` (upper case), without `[DEFAULT]`.
    pub fn keys(&self, section: &str) -> Vec<String> {
        self.sections
            .get(section)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn has_section(&self, section: &str) -> bool {
        self.sections.contains_key(section)
    }

    /// Section names, in file order.
    pub fn sections(&self) -> Vec<String> {
        let mut v: Vec<(usize, String)> = self
            .sections
            .keys()
            .map(|s| (self.section_line(s).unwrap_or(0), s.clone()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// 1-based line of a section header (None for sections made by [`Ini::set`]).
    pub fn section_line(&self, section: &str) -> Option<usize> {
        self.lines
            .get(&(section.to_string(), String::new()))
            .copied()
    }

    /// 1-based line where `key` was set in `section`.
    pub fn key_line(&self, section: &str, key: &str) -> Option<usize> {
        self.lines
            .get(&(section.to_string(), key.to_ascii_uppercase()))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sections_interpolation_and_continuations() {
        let ini = Ini::parse(
            "# c\n[DEFAULT]\nROOT = /r\n[agent]\nVAR_CACHE = /var/cache/x\ncode_repo = %(VAR_CACHE)s/code\n\
             multi = a\n  b\nDIR: %(ROOT)s/etc\n; c2\n",
        )
        .unwrap();
        assert_eq!(ini.get("agent", "CODE_REPO").unwrap(), "/var/cache/x/code");
        assert_eq!(ini.get("agent", "MULTI").unwrap(), "a\nb");
        assert_eq!(ini.get("agent", "dir").unwrap(), "/r/etc");
        assert!(ini
            .require("agent", "LOG_FILE")
            .unwrap_err()
            .to_string()
            .contains("Missing configuration variable LOG_FILE"));
        assert_eq!(ini.parse_or("agent", "PORT", 5555u16).unwrap(), 5555);
    }

    #[test]
    fn rejects_malformed() {
        assert!(Ini::parse("KEY = 1\n").is_err());
        assert!(Ini::parse("[a\n").is_err());
        assert!(Ini::parse("[a]\njunk\n").is_err());
    }
}
