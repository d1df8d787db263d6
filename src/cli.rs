//! Command line: `svcd run` and the client commands that talk to a running daemon.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use svcd_config::Override;

/// The package version and the git revision it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SVCD_REVISION"), ")");

/// How client commands print what they got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns, for people.
    Table,
    /// JSON, for programs.
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "svcd",
    version = VERSION,
    about = "Service discovery and load balancing daemon"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (embedded store and loopback listeners unless configured otherwise).
    Run(RunArgs),
    /// Validate or print configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Register an instance with the local daemon (held under the daemon's lease).
    Register(RegisterArgs),
    /// Remove an instance: SERVICE[.NS]/ID.
    Deregister {
        instance: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Drain an instance (SERVICE[.NS]/ID), or with --all every registration this daemon holds:
    /// DNS and the proxies stop sending them new work, open connections finish.
    Drain {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        instance: Option<String>,
        /// Every registration of the local daemon (what SIGTERM does first; for preStop hooks).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List services, or the instances of one service with their state.
    List {
        /// SERVICE[.NS]
        service: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the addresses DNS and the proxies would use for SERVICE[.NS] (healthy instances).
    Resolve {
        service: String,
        /// Print IP:PORT for this named port instead of bare IPs.
        #[arg(long)]
        port: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the version and the git revision svcd was built from.
    Version,
    /// Exit 0 if the local daemon answers /healthz (with --ready: /readyz), else 1; for container
    /// HEALTHCHECKs and scripts.
    Health {
        /// Check readiness (registry synced, listeners bound) instead of liveness.
        #[arg(long)]
        ready: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page svcd(1) (roff) to stdout, or write every page (svcd(1) and one per
    /// subcommand, e.g. svcd-run(1)) into a directory.
    Man {
        /// Write svcd.1, svcd-run.1, svcd-config-check.1, … into this directory (created if
        /// missing) instead of printing svcd.1.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Print the instances of SERVICE[.NS] and then every change to them, as it happens (a
    /// blocking query on the local daemon), until interrupted.
    Watch {
        service: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Run CMD registered as an instance of a service while it lives; deregister the moment it
    /// exits and exit with its status.
    Exec(ExecArgs),
}

// Parsed once per process; variant size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE (with the same environment and overrides as `run`) and print the effective
    /// configuration.
    Check {
        file: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
    },
    /// Print a fully commented default configuration file.
    Default,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file; re-read on SIGHUP.
    #[arg(long, short = 'c', env = "SVCD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub overrides: OverrideArgs,
}

/// Flags that override configuration keys (they win over `SVCD_*` variables and the file).
#[derive(Debug, Args, Default)]
pub struct OverrideArgs {
    /// admin.listen
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// dns.listen
    #[arg(long)]
    pub dns_listen: Option<String>,
    /// proxy.http listeners, comma-separated
    #[arg(long)]
    pub http_listen: Option<String>,
    /// registry.backend: embedded | etcd
    #[arg(long)]
    pub registry_backend: Option<String>,
    /// registry.etcd.endpoints, comma-separated
    #[arg(long)]
    pub etcd_endpoints: Option<String>,
    /// registry.lease_ttl
    #[arg(long)]
    pub lease_ttl: Option<String>,
    /// shutdown.drain_timeout
    #[arg(long)]
    pub drain_timeout: Option<String>,
    /// log.level (RUST_LOG-style filter)
    #[arg(long)]
    pub log_level: Option<String>,
    /// log.format: human | json
    #[arg(long)]
    pub log_format: Option<String>,
    /// Any key: --set dns.ttl=10s (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl OverrideArgs {
    pub fn to_overrides(&self) -> Result<Vec<Override>, String> {
        let flags = [
            ("admin.listen", &self.admin_listen),
            ("dns.listen", &self.dns_listen),
            ("proxy.http", &self.http_listen),
            ("registry.backend", &self.registry_backend),
            ("registry.etcd.endpoints", &self.etcd_endpoints),
            ("registry.lease_ttl", &self.lease_ttl),
            ("shutdown.drain_timeout", &self.drain_timeout),
            ("log.level", &self.log_level),
            ("log.format", &self.log_format),
        ];
        let mut out: Vec<Override> = flags
            .iter()
            .filter_map(|(key, value)| value.as_deref().map(|v| Override::known(key, v)))
            .collect();
        for s in &self.set {
            out.push(Override::parse_set(s)?);
        }
        Ok(out)
    }
}

/// How client commands reach the daemon.
#[derive(Debug, Args, Clone)]
pub struct AdminArgs {
    /// Admin API of the local daemon: IP:PORT or unix:/PATH [default: unix:/run/svcd/admin.sock
    /// when it exists, else 127.0.0.1:9901].
    #[arg(long = "admin", env = "SVCD_ADMIN_LISTEN")]
    pub addr: Option<String>,
    /// File with the admin bearer token, if the daemon requires one.
    #[arg(long, env = "SVCD_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl AdminArgs {
    /// Where to reach the daemon: as given, else the packaged daemon's unix socket when it
    /// exists, else the default TCP address.
    pub fn target(&self) -> anyhow::Result<svcd_config::AdminListen> {
        use svcd_config::AdminListen;
        let text = match &self.addr {
            Some(text) => text.clone(),
            None if std::path::Path::new(AdminListen::DEFAULT_UNIX).exists() => {
                format!("unix:{}", AdminListen::DEFAULT_UNIX)
            }
            None => "127.0.0.1:9901".into(),
        };
        AdminListen::parse(&text).map_err(|e| anyhow::anyhow!("--admin: {e}"))
    }
}

/// The instance description shared by `register` and `exec`.
#[derive(Debug, Args, Clone)]
pub struct InstanceArgs {
    /// Instance IP address.
    #[arg(long)]
    pub ip: Option<std::net::IpAddr>,
    /// Named port NAME=PORT (repeatable).
    #[arg(long = "port", value_name = "NAME=PORT")]
    pub ports: Vec<String>,
    /// tcp | http | h2 | grpc
    #[arg(long)]
    pub protocol: Option<String>,
    #[arg(long)]
    pub weight: Option<u32>,
    /// Tag (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Metadata KEY=VALUE (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// Node name (default: the daemon's).
    #[arg(long)]
    pub node: Option<String>,
    /// Active health check: tcp | http | grpc | none (`svcd exec` defaults to tcp on its first
    /// port). grpc calls grpc.health.v1.Health/Check over h2c.
    #[arg(long)]
    pub check: Option<String>,
    /// Named port the check probes (default: the first port).
    #[arg(long)]
    pub check_port: Option<String>,
    /// HTTP check path.
    #[arg(long, default_value = "/healthz")]
    pub check_path: String,
    #[arg(long, default_value = "2s")]
    pub check_interval: String,
    #[arg(long, default_value = "1s")]
    pub check_timeout: String,
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// SERVICE[.NS]
    pub service: String,
    /// Instance id (RFC 1123 label).
    pub id: String,
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// healthy | unhealthy | draining
    #[arg(long)]
    pub state: Option<String>,
    /// Remove the registration unless renewed (registered again) within this time.
    #[arg(long)]
    pub ttl: Option<String>,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// SERVICE[.NS] to register CMD under.
    #[arg(long)]
    pub service: String,
    /// Instance id; default <service>-<hostname>-<pid>.
    #[arg(long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// The daemon removes the registration if svcd exec stops renewing it for this long (e.g. it
    /// was SIGKILLed).
    #[arg(long, default_value = "10s")]
    pub ttl: String,
    /// On SIGTERM, drain the instance and wait this long before passing the signal to CMD.
    #[arg(long, default_value = "5s")]
    pub drain_timeout: String,
    #[command(flatten)]
    pub admin: AdminArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}
