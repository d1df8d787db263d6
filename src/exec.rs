//! `svcd exec`: "when a process starts, add it; when it dies, remove it".
//!
//! Spawns CMD, registers it with the local daemon under a renewal TTL, forwards signals to it,
//! and deregisters the moment it exits — so the instance leaves DNS and the proxies in
//! milliseconds, not after a lease TTL — then exits with CMD's status. If `svcd exec` itself is
//! killed, the daemon drops the registration once renewals stop (after `--ttl`), and CMD gets
//! SIGTERM from the kernel (a parent-death signal, set through util-linux's `setpriv`), so it
//! is never left running unregistered.
//!
//! Signals from the terminal (Ctrl-C, Ctrl-\\) already reach CMD, which shares the foreground
//! process group: they are not forwarded a second time.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use http::Method;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tracing::warn;

use crate::cli::ExecArgs;
use crate::client::AdminClient;
use crate::commands::{instance_json, service_path};

/// `<service>-<host>-<pid>`, folded into one valid DNS label.
fn default_id(service: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let svc = service.split('.').next().unwrap_or(service);
    let raw = format!("{svc}-{}-{}", host.trim(), std::process::id());
    let mut id: String = raw
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    id.truncate(63);
    id.trim_matches('-').to_string()
}

/// Whether `sig` is one the terminal sends to its whole foreground process group (Ctrl-C,
/// Ctrl-\\) while `svcd exec` — and so CMD, in the same group — is in the foreground.
fn from_terminal(sig: Signal) -> bool {
    matches!(sig, Signal::SIGINT | Signal::SIGQUIT)
        && nix::unistd::tcgetpgrp(std::io::stdin()).is_ok_and(|fg| fg == nix::unistd::getpgrp())
}

pub async fn run(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.admin)?;
    let ttl =
        humantime::parse_duration(&args.ttl).with_context(|| format!("--ttl {:?}", args.ttl))?;
    anyhow::ensure!(ttl >= Duration::from_secs(1), "--ttl must be at least 1s");
    let id = args.id.clone().unwrap_or_else(|| default_id(&args.service));
    let instance_path = format!(
        "/v1/services/{}/instances/{id}",
        service_path(&args.service)?
    );
    let mut instance = instance_json(&args.instance, Some("tcp"))?;
    let mut body = serde_json::to_vec(&instance)?;
    let drain_timeout = humantime::parse_duration(&args.drain_timeout)
        .with_context(|| format!("--drain-timeout {:?}", args.drain_timeout))?;
    let put_path = format!("{instance_path}?ttl={}", humantime::format_duration(ttl));

    // Signal handlers first: a SIGTERM that arrives once the instance is registered must drain
    // it, not kill this wrapper with the default action and leave the entry until its TTL.
    let forwarded = [
        (SignalKind::terminate(), Signal::SIGTERM),
        (SignalKind::interrupt(), Signal::SIGINT),
        (SignalKind::hangup(), Signal::SIGHUP),
        (SignalKind::quit(), Signal::SIGQUIT),
        (SignalKind::user_defined1(), Signal::SIGUSR1),
        (SignalKind::user_defined2(), Signal::SIGUSR2),
    ];
    let (sig_tx, mut sig_rx) = tokio::sync::mpsc::unbounded_channel();
    for (kind, sig) in forwarded {
        let mut stream = signal(kind)?;
        let tx = sig_tx.clone();
        // `svcd exec`, not the daemon: these forwarders live as long as the wrapped process
        // (the runtime ends with it).
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(sig).is_err() {
                    return;
                }
            }
        });
    }

    // setpriv execs CMD in place (same pid) with the parent-death signal set.
    let mut child = tokio::process::Command::new("setpriv")
        .args(["--pdeathsig", "TERM", "--"])
        .args(&args.command)
        .spawn()
        .with_context(|| format!("cannot start {:?} (through setpriv)", args.command[0]))?;
    let pid = Pid::from_raw(child.id().context("child has no pid")? as i32);

    let mut registered = match client
        .call(Method::PUT, &put_path, Some(body.clone()))
        .await
    {
        Ok(_) => true,
        Err(e) => {
            warn!(error = %e, "registration failed; retrying while the command runs");
            false
        }
    };

    // Renew well inside the TTL; retry faster while not registered.
    let renew_every = ttl / 3;
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
    // SIGTERM while serving: drain first (no new work reaches the instance), then pass the signal
    // on once the drain time is over. A second SIGTERM goes through at once.
    let mut pending_term: Option<tokio::time::Instant> = None;
    let mut drained = false;
    let status = loop {
        let term_at = pending_term
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400));
        tokio::select! {
            status = child.wait() => break status?,
            Some(sig) = sig_rx.recv() => {
                if sig == Signal::SIGTERM && !drained && !drain_timeout.is_zero() {
                    drained = true;
                    instance["state"] = serde_json::json!("draining");
                    body = serde_json::to_vec(&instance)?;
                    if let Err(e) = client.call(Method::POST, &format!("{instance_path}/drain"), None).await {
                        warn!(error = %e, "drain failed; stopping the command anyway after the drain timeout");
                    }
                    pending_term = Some(tokio::time::Instant::now() + drain_timeout);
                } else if from_terminal(sig) {
                    // The terminal signalled the whole foreground group: CMD has it already.
                } else {
                    pending_term = None;
                    let _ = kill(pid, sig);
                }
            }
            _ = tokio::time::sleep_until(term_at), if pending_term.is_some() => {
                pending_term = None;
                let _ = kill(pid, Signal::SIGTERM);
            }
            _ = renew.tick() => {
                match client.call(Method::PUT, &put_path, Some(body.clone())).await {
                    Ok(_) => registered = true,
                    Err(e) => warn!(error = %e, registered, "registration renewal failed"),
                }
            }
        }
    };

    // Deregister first, then report: the instance must leave the cluster's view immediately.
    if let Err(e) = client.call(Method::DELETE, &instance_path, None).await {
        if registered {
            warn!(error = %e, "deregistration failed; the daemon drops the entry after --ttl");
        }
    }
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        _ => ExitCode::FAILURE,
    })
}
