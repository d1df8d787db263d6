//! svcd: service discovery and load balancing daemon.
//!
//! The binary owns the command line, the admin API and the wiring of the member crates:
//! `svcd-config` (what to run) → `svcd-registry` (who is where) → `svcd-lb` (endpoint health
//! and selection) → `svcd-proxy`, with `svcd-dns` reading the registry snapshot (serving it).
//! See `docs/` for the design.

mod admin;
mod cli;
mod client;
mod commands;
mod consul;
mod daemon;
mod exec;
mod logging;
mod manual;
mod metrics;
mod notify;
mod readiness;
mod restart_keys;

use clap::Parser;
use svcd_config::{ProcessEnv, Sources, DEFAULT_CONFIG_TOML};

use crate::cli::{Cli, Command, ConfigCommand};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        // Client commands log warnings (e.g. `exec` renewal failures) plainly to stderr.
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .init();
    }
    // The control plane, the admin API and DNS over TCP run here; the proxies run on their own
    // worker threads (`proxy.workers`, svcd_proxy::workers), DNS over UDP on its own too.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("svcd: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("svcd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match command {
        Command::Run(args) => {
            let mut sources = Sources::new()
                .env(ProcessEnv)
                .cli(args.overrides.to_overrides().map_err(anyhow::Error::msg)?);
            if let Some(path) = &args.config {
                sources = sources.file(path);
            }
            daemon::run(sources).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Default) => {
            print!("{DEFAULT_CONFIG_TOML}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { file, overrides }) => {
            let sources = Sources::new()
                .file(&file)
                .env(ProcessEnv)
                .cli(overrides.to_overrides().map_err(anyhow::Error::msg)?);
            match sources.load() {
                Ok(config) => {
                    eprintln!("{}: ok", file.display());
                    print!("{}", config.to_toml());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    for line in e.lines() {
                        eprintln!("{}: {line}", file.display());
                    }
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::Register(args) => commands::register(args).await,
        Command::Deregister { instance, admin } => commands::deregister(&instance, &admin).await,
        Command::Drain {
            instance,
            all,
            admin,
        } => match (instance, all) {
            (_, true) => commands::drain_all(&admin).await,
            (Some(instance), false) => commands::drain(&instance, &admin).await,
            (None, false) => unreachable!("clap requires an instance without --all"),
        },
        Command::List {
            service,
            output,
            admin,
        } => commands::list(service.as_deref(), output, &admin).await,
        Command::Resolve {
            service,
            port,
            output,
            admin,
        } => commands::resolve(&service, port.as_deref(), output, &admin).await,
        Command::Health { ready, admin } => commands::health(ready, &admin).await,
        Command::XdsBootstrap {
            server,
            node_id,
            envoy,
            tls_ca,
            tls_cert,
            tls_key,
            tls_server_name,
        } => {
            let tls = tls_ca.map(|ca| svcd_xds::bootstrap::ClientTls {
                ca,
                cert_key: tls_cert.zip(tls_key),
                server_name: tls_server_name,
            });
            let text = if envoy {
                svcd_xds::bootstrap::envoy(&server, &node_id, tls.as_ref())
            } else {
                svcd_xds::bootstrap::grpc(&server, &node_id, tls.as_ref())
            };
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("svcd {}", cli::VERSION);
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            let mut command = <cli::Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "svcd", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out_dir } => {
            match out_dir {
                None => manual::render_main(&mut std::io::stdout())?,
                Some(dir) => {
                    for page in manual::write_all(&dir)? {
                        println!("{}", page.display());
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { service, admin } => commands::watch(&service, &admin).await,
        Command::Exec(args) => exec::run(args).await,
    }
}
