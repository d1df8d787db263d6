use std::fmt;

/// One problem with one key. `path` uses the TOML spelling users type:
/// `proxy.http[1].listen`, `registry.static[0].ports.http`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or a value has the wrong TOML type / an unknown key. Serde stops at the
    /// first such error; `path` still names the key.
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    /// Every semantic problem found, all at once.
    #[error("{}", join(.0))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// All problems as separate `path: message` lines, for logs and `config check`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid(errors) => errors.iter().map(|e| e.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

fn join(errors: &[FieldError]) -> String {
    let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    format!(
        "{} configuration error(s):\n  {}",
        errors.len(),
        lines.join("\n  ")
    )
}
