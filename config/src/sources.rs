//! Layering: file < `SVCD_*` environment < CLI. Every layer writes into one TOML table, which is
//! then deserialized and validated once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::checks::validate;
use crate::error::{ConfigError, FieldError};
use crate::model::Config;
use crate::raw::RawConfig;
use crate::suggest::{self, Step};

/// Where environment variables come from; a trait so tests can supply a map instead of mutating
/// the process environment (which races between parallel tests).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// How an override's text becomes a TOML value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Taken as a string, verbatim.
    Text,
    /// Comma-separated list of strings.
    List,
    /// Comma-separated addresses, each becoming a `{ listen = ... }` table.
    Listeners,
}

/// The supported `SVCD_*` variables and the key each one sets. The same keys have CLI flags,
/// except the etcd credentials: a password on a command line is visible to every local user.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("SVCD_ADMIN_LISTEN", "admin.listen"),
    ("SVCD_ADMIN_TOKEN_FILE", "admin.token_file"),
    ("SVCD_DNS_LISTEN", "dns.listen"),
    ("SVCD_DNS_DOMAIN", "dns.domain"),
    ("SVCD_HTTP_LISTEN", "proxy.http"),
    ("SVCD_REGISTRY_BACKEND", "registry.backend"),
    ("SVCD_ETCD_ENDPOINTS", "registry.etcd.endpoints"),
    ("SVCD_ETCD_USERNAME", "registry.etcd.username"),
    ("SVCD_ETCD_PASSWORD", "registry.etcd.password"),
    ("SVCD_LEASE_TTL", "registry.lease_ttl"),
    ("SVCD_NODE", "registry.node"),
    ("SVCD_DRAIN_TIMEOUT", "shutdown.drain_timeout"),
    ("SVCD_LOG_LEVEL", "log.level"),
    ("SVCD_LOG_FORMAT", "log.format"),
];

fn shape_of(key: &str) -> Shape {
    match key {
        "registry.etcd.endpoints" | "dns.listen" => Shape::List,
        "proxy.http" => Shape::Listeners,
        _ => Shape::Text,
    }
}

/// A key's path as steps, for [`crate::suggest`].
fn steps(path: &serde_ignored::Path<'_>, out: &mut Vec<Step>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            steps(parent, out);
            out.push(Step::Index(*index));
        }
        Path::Map { parent, key } => {
            steps(parent, out);
            out.push(Step::Key(key.clone()));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => steps(parent, out),
    }
}

/// A key's path as the config spells it: `proxy.tcp[0].listen`.
fn key_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => match key_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => key_path(parent),
    }
}

/// One `key = value` set from the environment or the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub key: String,
    pub value: toml::Value,
}

impl Override {
    /// An override for one of the well-known keys, shaped as that key expects (list keys split
    /// on commas).
    pub fn known(key: &str, text: &str) -> Override {
        let value = match shape_of(key) {
            Shape::Text => toml::Value::String(text.to_string()),
            Shape::List => toml::Value::Array(
                split_list(text)
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
            Shape::Listeners => toml::Value::Array(
                split_list(text)
                    .map(|s| {
                        let mut t = toml::Table::new();
                        t.insert("listen".into(), toml::Value::String(s.to_string()));
                        toml::Value::Table(t)
                    })
                    .collect(),
            ),
        };
        Override {
            key: key.to_string(),
            value,
        }
    }

    /// Parses `--set key.path=value`. The value is read as a TOML value when it is one
    /// (`5`, `true`, `["a"]`, `{ listen = "..." }`) and as a plain string otherwise.
    pub fn parse_set(text: &str) -> Result<Override, String> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(|part| part.is_empty()) {
            return Err(format!("{text:?}: invalid key {key:?}"));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        Ok(Override {
            key: key.to_string(),
            value,
        })
    }

    fn apply(&self, root: &mut toml::Table) {
        let mut parts: Vec<&str> = self.key.split('.').collect();
        let last = parts.pop().expect("key has at least one part");
        let mut table = root;
        for part in parts {
            let entry = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            table = entry.as_table_mut().expect("just made a table");
        }
        table.insert(last.to_string(), self.value.clone());
    }
}

fn split_list(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Builder for one load of the configuration from all its sources.
pub struct Sources {
    file: Option<PathBuf>,
    file_text: Option<String>,
    env: Box<dyn Env + Send + Sync>,
    cli: Vec<Override>,
}

impl Default for Sources {
    fn default() -> Self {
        Self::new()
    }
}

impl Sources {
    /// No file, an empty environment, no CLI overrides.
    pub fn new() -> Self {
        Self {
            file: None,
            file_text: None,
            env: Box::new(HashMap::<String, String>::new()),
            cli: Vec::new(),
        }
    }

    pub fn file(mut self, path: impl AsRef<Path>) -> Self {
        self.file = Some(path.as_ref().to_path_buf());
        self
    }

    pub fn file_text(mut self, text: &str) -> Self {
        self.file_text = Some(text.to_string());
        self
    }

    pub fn env(mut self, env: impl Env + Send + Sync + 'static) -> Self {
        self.env = Box::new(env);
        self
    }

    pub fn cli(mut self, overrides: Vec<Override>) -> Self {
        self.cli = overrides;
        self
    }

    pub fn file_path(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Reads the file (again, on reload), layers the overrides, validates.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let (text, origin) = match (&self.file_text, &self.file) {
            (Some(text), _) => (text.clone(), "config".to_string()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                (text, path.display().to_string())
            }
            (None, None) => (String::new(), "config".to_string()),
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: origin,
            message: e.to_string().trim_end().to_string(),
        })?;
        for (var, key) in ENV_OVERRIDES {
            if let Some(value) = self.env.var(var) {
                Override::known(key, &value).apply(&mut table);
            }
        }
        for o in &self.cli {
            o.apply(&mut table);
        }
        // Unknown keys are collected, all of them, rather than failing on the first.
        let mut unknown = Vec::new();
        let mut note = |path: serde_ignored::Path<'_>| {
            let mut at = Vec::new();
            steps(&path, &mut at);
            unknown.push(FieldError::new(key_path(&path), suggest::unknown_key(&at)));
        };
        let ignoring = serde_ignored::Deserializer::new(toml::Value::Table(table), &mut note);
        let raw: Result<RawConfig, _> = serde_path_to_error::deserialize(ignoring);
        let raw = raw.map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Syntax {
                path: if path == "." { "config".into() } else { path },
                message: e.into_inner().to_string(),
            }
        })?;
        match validate(raw) {
            Ok(config) if unknown.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError::Invalid(unknown)),
            Err(mut errors) => {
                errors.splice(0..0, unknown);
                Err(ConfigError::Invalid(errors))
            }
        }
    }
}
