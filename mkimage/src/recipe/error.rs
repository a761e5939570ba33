//! The one error type of recipe reading: every message names where it came from.

use std::fmt;

/// A recipe could not be read or is invalid.
///
/// Displayed as `FILE:LINE: key `KEY`: MESSAGE`; the line and key parts are left out
/// when unknown. Command-line overrides use the file `command line` and keys such as
/// `--cloud`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeError {
    pub file: String,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

/// The file name used for errors in command-line overrides.
pub const COMMAND_LINE: &str = "command line";

impl RecipeError {
    pub fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        RecipeError {
            file: file.into(),
            line: None,
            key: None,
            message: message.into(),
        }
    }

    pub fn at(
        file: impl Into<String>,
        line: Option<usize>,
        key: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        RecipeError {
            file: file.into(),
            line,
            key: key.map(str::to_string),
            message: message.into(),
        }
    }

    /// An error in a command-line override such as `--cloud`.
    pub fn command_line(flag: &str, message: impl Into<String>) -> Self {
        RecipeError::at(COMMAND_LINE, None, Some(flag), message)
    }
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for RecipeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_all_parts() {
        let e = RecipeError::at("a.toml", Some(5), Some("cloud"), "Unknown cloud `aws`");
        assert_eq!(e.to_string(), "a.toml:5: key `cloud`: Unknown cloud `aws`");
    }

    #[test]
    fn display_omits_unknown_parts() {
        assert_eq!(RecipeError::new("a.cfg", "boom").to_string(), "a.cfg: boom");
        let e = RecipeError::at("a.cfg", Some(3), None, "bad line");
        assert_eq!(e.to_string(), "a.cfg:3: bad line");
        let e = RecipeError::command_line("--cloud", "Unknown cloud `x`");
        assert_eq!(
            e.to_string(),
            "command line: key `--cloud`: Unknown cloud `x`"
        );
    }
}
