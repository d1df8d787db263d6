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
    #[command(after_help = RUN_AFTER_HELP)]
    Run(RunArgs),
    /// Validate or print configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Register an instance with the local daemon (held under the daemon's lease).
    #[command(mut_arg("check", |a| a.help(CHECK_HELP_REGISTER)))]
    Register(RegisterArgs),
    /// Remove an instance: SERVICE[.NS]/ID.
    Deregister {
        /// The instance to remove, e.g. web/web-1 or web.shop/web-1 (namespace "default" when
        /// omitted).
        #[arg(value_name = "SERVICE[.NS]/ID")]
        instance: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Drain an instance (SERVICE[.NS]/ID), or with --all every registration this daemon holds:
    /// DNS and the proxies stop sending them new work, open connections finish.
    Drain {
        /// The instance to drain, e.g. web/web-1 or web.shop/web-1 (namespace "default" when
        /// omitted).
        #[arg(
            value_name = "SERVICE[.NS]/ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        instance: Option<String>,
        /// Every registration of the local daemon (what SIGTERM does first; for preStop hooks).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List services, or the instances of one service with their state.
    List {
        /// List the instances of this service (namespace "default" when omitted) instead of
        /// every service.
        #[arg(value_name = "SERVICE[.NS]")]
        service: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the addresses DNS and the proxies would use for SERVICE[.NS] (healthy instances).
    Resolve {
        /// The service to resolve (namespace "default" when omitted).
        #[arg(value_name = "SERVICE[.NS]")]
        service: String,
        /// Print IP:PORT for this named port instead of bare IPs.
        #[arg(long)]
        port: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the bootstrap file an xDS client needs to reach svcd: gRPC's JSON
    /// (GRPC_XDS_BOOTSTRAP), or with --envoy an Envoy YAML with an ADS cluster (docs/xds.md).
    XdsBootstrap {
        /// The xDS server ([xds] listen): IP:PORT or unix:/PATH.
        #[arg(long, value_name = "ADDR")]
        server: svcd_xds::bootstrap::ServerAddr,
        /// The node id the client reports (shown in GET /v1/xds/clients).
        #[arg(long, value_name = "ID")]
        node_id: String,
        /// Print an Envoy bootstrap (YAML) instead of a gRPC one (JSON).
        #[arg(long)]
        envoy: bool,
        /// Connect with TLS ([xds.tls]), trusting the CA in this PEM file.
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<String>,
        /// The client certificate (PEM) for a listener with xds.tls.client_ca; needs --tls-key.
        #[arg(long, value_name = "FILE", requires = "tls_key", requires = "tls_ca")]
        tls_cert: Option<String>,
        /// The client certificate's private key (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<String>,
        /// The DNS name on svcd's certificate, when --server is an IP address.
        #[arg(long, value_name = "NAME", requires = "tls_ca")]
        tls_server_name: Option<String>,
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
    Completions {
        /// The shell to print completions for.
        shell: clap_complete::Shell,
    },
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
        /// The service to watch (namespace "default" when omitted).
        #[arg(value_name = "SERVICE[.NS]")]
        service: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Run CMD registered as an instance of a service while it lives; deregister the moment it
    /// exits and exit with its status.
    #[command(mut_arg("check", |a| a.help(CHECK_HELP_EXEC)))]
    Exec(ExecArgs),
}

/// `--check` of `svcd register`: no check unless asked for.
const CHECK_HELP_REGISTER: &str = "Active health check: tcp | http | grpc | none [default: none]. \
     grpc calls grpc.health.v1.Health/Check over h2c";

/// `--check` of `svcd exec`: TCP on the first port unless told otherwise.
const CHECK_HELP_EXEC: &str = "Active health check: tcp | http | grpc | none [default: tcp on the \
     first --port]. grpc calls grpc.health.v1.Health/Check over h2c";

// Parsed once per process; variant size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE (with the same environment and overrides as `run`) and print the effective
    /// configuration.
    #[command(after_help = RUN_AFTER_HELP)]
    Check {
        /// The TOML configuration file to check.
        #[arg(value_name = "FILE")]
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

/// Flags that override configuration keys (they win over `SVCD_*` variables and the file). Each
/// one with a variable reads it too (clap's `env`), so `--help` and the manual name it; that is
/// the same value at the same precedence as the config crate's own environment layer
/// ([`svcd_config::ENV_OVERRIDES`], which also covers the etcd credentials, deliberately without
/// flags: a password on a command line is visible to every local user).
#[derive(Debug, Args, Default)]
pub struct OverrideArgs {
    /// Admin API listener (admin.listen): IP:PORT or unix:/PATH.
    #[arg(long, value_name = "ADDR", env = "SVCD_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// File with the admin API's bearer token (admin.token_file).
    #[arg(long, value_name = "FILE", env = "SVCD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<String>,
    /// DNS listeners (dns.listen), comma-separated IP:PORT.
    #[arg(long, value_name = "ADDRS", env = "SVCD_DNS_LISTEN")]
    pub dns_listen: Option<String>,
    /// Cluster domain DNS answers for (dns.domain).
    #[arg(long, value_name = "DOMAIN", env = "SVCD_DNS_DOMAIN")]
    pub dns_domain: Option<String>,
    /// HTTP proxy listeners (proxy.http), comma-separated IP:PORT.
    #[arg(long, value_name = "ADDRS", env = "SVCD_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Registry store (registry.backend): embedded | etcd.
    #[arg(long, value_name = "BACKEND", env = "SVCD_REGISTRY_BACKEND")]
    pub registry_backend: Option<String>,
    /// etcd endpoints (registry.etcd.endpoints), comma-separated HOST:PORT.
    #[arg(long, value_name = "ENDPOINTS", env = "SVCD_ETCD_ENDPOINTS")]
    pub etcd_endpoints: Option<String>,
    /// Lease TTL of this daemon's registrations (registry.lease_ttl), e.g. 10s.
    #[arg(long, value_name = "DURATION", env = "SVCD_LEASE_TTL")]
    pub lease_ttl: Option<String>,
    /// This node's name (registry.node); default: the hostname.
    #[arg(long, value_name = "NAME", env = "SVCD_NODE")]
    pub node: Option<String>,
    /// Time in-flight work gets at shutdown (shutdown.drain_timeout), e.g. 10s.
    #[arg(long, value_name = "DURATION", env = "SVCD_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Log filter (log.level), RUST_LOG-style, e.g. info,svcd_registry=debug.
    #[arg(long, value_name = "FILTER", env = "SVCD_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format (log.format): human | json.
    #[arg(long, value_name = "FORMAT", env = "SVCD_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Any key: --set dns.ttl=10s (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// What `svcd run --help` and `svcd-run(1)` add below the flags: the variables without a flag.
pub const RUN_AFTER_HELP: &str = "\
Environment without a flag (a password on a command line is visible to every local user):
  SVCD_ETCD_USERNAME  registry.etcd.username
  SVCD_ETCD_PASSWORD  registry.etcd.password (or registry.etcd.password_file)";

impl OverrideArgs {
    pub fn to_overrides(&self) -> Result<Vec<Override>, String> {
        let flags = [
            ("admin.listen", &self.admin_listen),
            ("admin.token_file", &self.admin_token_file),
            ("dns.listen", &self.dns_listen),
            ("dns.domain", &self.dns_domain),
            ("proxy.http", &self.http_listen),
            ("registry.backend", &self.registry_backend),
            ("registry.etcd.endpoints", &self.etcd_endpoints),
            ("registry.lease_ttl", &self.lease_ttl),
            ("registry.node", &self.node),
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
    #[arg(long = "admin", value_name = "ADDR", env = "SVCD_ADMIN_LISTEN")]
    pub addr: Option<String>,
    /// File with the admin bearer token, if the daemon requires one.
    #[arg(long, value_name = "FILE", env = "SVCD_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl AdminArgs {
    /// Where to reach the daemon: as given, else the packaged daemon's unix socket when it
    /// exists, else the default TCP address.
    pub fn target(&self) -> anyhow::Result<svcd_config::AdminListen> {
        use svcd_config::AdminListen;
        let socket = std::path::Path::new(AdminListen::DEFAULT_UNIX);
        let text = match &self.addr {
            Some(text) => text.clone(),
            None => match socket.try_exists() {
                Ok(true) => format!("unix:{}", AdminListen::DEFAULT_UNIX),
                Ok(false) => "127.0.0.1:9901".into(),
                // /run/svcd is the daemon's group's: a user outside it cannot even see the
                // socket. Falling back to TCP would reach the metrics-only listener of a
                // packaged node and fail with a misleading answer.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(crate::client::no_permission(socket))
                }
                Err(e) => anyhow::bail!("{}: {e}", socket.display()),
            },
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
    /// Relative share of traffic (proxies, DNS rotation) and SRV weight, 1..=65535 [default: 1].
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
    /// Active health check: tcp | http | grpc | none. grpc calls grpc.health.v1.Health/Check over
    /// h2c. (Each subcommand states its default: `register` and `exec` differ.)
    #[arg(long, value_name = "KIND")]
    pub check: Option<String>,
    /// Named port the check probes (default: the first port).
    #[arg(long)]
    pub check_port: Option<String>,
    /// HTTP check path.
    #[arg(long, default_value = "/healthz")]
    pub check_path: String,
    /// Time between active health checks.
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    pub check_interval: String,
    /// Time a health check may take before it counts as failed.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every subcommand at any depth, with its path (`svcd config check`).
    fn commands() -> Vec<(String, clap::Command)> {
        let mut root = Cli::command();
        root.build();
        let mut out = Vec::new();
        let mut pending = vec![("svcd".to_string(), root)];
        while let Some((path, cmd)) = pending.pop() {
            for sub in cmd.get_subcommands() {
                pending.push((format!("{path} {}", sub.get_name()), sub.clone()));
            }
            out.push((path, cmd));
        }
        out
    }

    #[test]
    fn every_argument_and_subcommand_has_help() {
        let mut missing = Vec::new();
        for (path, cmd) in commands() {
            if cmd.get_about().is_none() && path != "svcd help" {
                missing.push(path.clone());
            }
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path}: {}", arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }

    /// The flag of `svcd run` that reads `var` and its help, if there is one.
    fn run_flag_reading(var: &str) -> Option<(String, String)> {
        let mut cmd = Cli::command();
        cmd.build();
        let run = cmd.find_subcommand("run").expect("run");
        let found = run
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == var))
            .map(|a| {
                (
                    a.get_long().expect("long flag").to_string(),
                    a.get_help().map(|h| h.to_string()).unwrap_or_default(),
                )
            });
        found
    }

    #[test]
    fn every_variable_of_run_is_shown_by_its_help() {
        let help = Cli::command()
            .find_subcommand_mut("run")
            .expect("run")
            .render_help()
            .to_string();
        for (var, key) in svcd_config::ENV_OVERRIDES {
            match run_flag_reading(var) {
                // clap prints `[env: VAR=…]` after the flag's help, which names the key the
                // variable sets.
                Some((flag, flag_help)) => {
                    assert!(help.contains(&format!("[env: {var}")), "{var}:\n{help}");
                    assert!(
                        flag_help.contains(key),
                        "--{flag} ({flag_help}) does not say it sets {key}"
                    );
                }
                // Only the etcd credentials have no flag, and the help lists them.
                None => {
                    assert!(
                        ["SVCD_ETCD_USERNAME", "SVCD_ETCD_PASSWORD"].contains(var),
                        "{var} has no flag"
                    );
                    assert!(help.contains(var) && help.contains(key), "{var}:\n{help}");
                }
            }
        }
        assert!(help.contains("[env: SVCD_CONFIG"), "{help}");
    }

    #[test]
    fn a_flag_and_its_variable_set_the_same_key() {
        // What clap reads from a variable becomes the flag's override: the same value at the
        // same precedence (above the file) as the config crate's own environment layer.
        let cli = Cli::try_parse_from(["svcd", "run", "--node", "n1", "--dns-domain", "example"])
            .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        let keys: Vec<String> = args
            .overrides
            .to_overrides()
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["dns.domain", "registry.node"]);
    }

    #[test]
    fn register_and_exec_each_state_their_own_check_default() {
        let mut cmd = Cli::command();
        let register = cmd
            .find_subcommand_mut("register")
            .unwrap()
            .render_help()
            .to_string();
        assert!(register.contains("[default: none]"), "{register}");
        assert!(!register.contains("exec"), "{register}");
        let exec = cmd
            .find_subcommand_mut("exec")
            .unwrap()
            .render_help()
            .to_string();
        assert!(
            exec.contains("[default: tcp on the first --port]"),
            "{exec}"
        );
    }
}
