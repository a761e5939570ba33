use std::path::PathBuf;

/// Why a registration failed, and what was cleaned up.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("invalid input: {0}")]
    Invalid(String),

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("configuration: {0}")]
    Config(String),

    #[error("authentication with {auth_url} failed: {message}")]
    Auth { auth_url: String, message: String },

    /// A cloud API call failed.
    #[error("{call} failed: {message}")]
    Api { call: String, message: String },

    /// The endpoint does not implement an API call (e.g. moto and ImportSnapshot).
    #[error("{call} is not implemented by the endpoint {endpoint}: {message}")]
    NotImplemented {
        call: String,
        endpoint: String,
        message: String,
    },

    /// What the cloud stored is not what we sent (or the file is not what was built).
    #[error("integrity check failed: {what}: expected {expected}, got {actual}")]
    Integrity {
        what: String,
        expected: String,
        actual: String,
    },

    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout { what: String, seconds: u64 },

    /// A failure injected by a test hook.
    #[error("injected failure: {0}")]
    Injected(String),

    /// A failure after resources had been created: says what was deleted again.
    #[error("{source}; {}", cleanup_text(.cleaned_up, .left_behind))]
    CleanedUp {
        #[source]
        source: Box<RegisterError>,
        /// Resources that were created and deleted again.
        cleaned_up: Vec<String>,
        /// Resources that could not be deleted (with the reason).
        left_behind: Vec<String>,
    },
}

fn cleanup_text(cleaned: &[String], left: &[String]) -> String {
    let mut s = if cleaned.is_empty() {
        "nothing created needed cleaning up".to_string()
    } else {
        format!("deleted what was created: {}", cleaned.join(", "))
    };
    if !left.is_empty() {
        s.push_str(&format!("; COULD NOT DELETE: {}", left.join(", ")));
    }
    s
}

impl RegisterError {
    pub(crate) fn api(call: &str, message: impl std::fmt::Display) -> Self {
        RegisterError::Api {
            call: call.to_string(),
            message: message.to_string(),
        }
    }

    /// The error before cleanup information was attached.
    pub fn root(&self) -> &RegisterError {
        match self {
            RegisterError::CleanedUp { source, .. } => source.root(),
            e => e,
        }
    }
}
