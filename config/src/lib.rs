//! svcd configuration: the one TOML file, layered with environment and CLI overrides, validated
//! into a [`Config`] that the rest of the daemon trusts without re-checking.
//!
//! Data flow:
//!
//! ```text
//! file text ──► toml::Table ──► overlay SVCD_* env ──► overlay CLI --set/flags ──► RawConfig (serde,
//!   deny_unknown_fields) ──► validate() ──► Config   (or every error, each with its key path)
//! ```
//!
//! Overrides are applied to the TOML table *before* deserialization, so a value given on the command
//! line is checked by exactly the same code as one written in the file, and its error names the same
//! key path. Precedence is CLI > environment > file > built-in default.
//!
//! This crate also owns the registration value model ([`Instance`]) and DNS-label rules
//! ([`names`]), because static registrations in the config file use them and every crate above
//! (registry, admin API, DNS) must agree on one definition.

mod checks;
mod default_file;
mod error;
mod instance;
mod model;
pub mod names;
mod raw;
mod sources;
mod suggest;

pub use default_file::DEFAULT_CONFIG_TOML;
pub use error::{ConfigError, FieldError};
pub use instance::{CheckKind, CheckSpec, Instance, Protocol, State, MAX_INSTANCE_JSON};
pub use model::{
    AdminConfig, AdminListen, Backend, Balance, Config, ConsulConfig, DnsConfig, DnsTcpConfig,
    EtcdConfig, EtcdTlsConfig, ForwardTarget, HttpListenerConfig, HttpRoute, L4ListenerConfig,
    L7Config, LogConfig, LogFormat, OutlierConfig, PanicMode, ProxyConfig, ProxyTarget,
    RegistryConfig, RrlConfig, ShutdownConfig, StaticInstance, XdsConfig, DEFAULT_MAX_FLOWS,
    MAX_REQUEST_TIMEOUT,
};
pub use model::{CertKeyFiles, SniRoute, TlsServerConfig, UpstreamTlsConfig};
pub use sources::{Env, Override, ProcessEnv, Sources, ENV_OVERRIDES};

/// Parse and validate one TOML document with no overrides (used by tests and `config check`).
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    Sources::new().file_text(text).load()
}

#[cfg(test)]
mod tests;
