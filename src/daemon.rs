//! `svcd run`: load config, start the registry and listeners, then wait for signals.
//!
//! Lifecycle: every long-lived task and thread runs in one of the daemon's [`Phase`]s (see
//! `svcd_lifecycle`), which hands out its stop signal and tracks what runs in it. First
//! SIGTERM/SIGINT, in order: `/readyz` answers 503 and this daemon's registrations are marked
//! `draining` in the store (other nodes stop sending); everything keeps serving for
//! `shutdown.readiness_grace`; then the phases stop in order:
//!
//! 1. `http proxy`, `l4 proxy`: stop accepting, drain for up to `shutdown.drain_timeout`, close
//!    what is left (DNS and the admin API still answer meanwhile);
//! 2. `proxy workers`: the worker threads the proxies ran on;
//! 3. `dns and admin`: DNS, the admin and metrics listeners, the service-manager notifier;
//! 4. `registry`: the watch, the active checks, the balancer and the lease keeper, which
//!    revokes the lease on its way out, so requests in flight read a live snapshot to the end.
//!
//! Exit 0, with a log line counting what was left running in each phase (nothing, normally). A
//! second signal exits at once (130). SIGHUP re-reads the config file and swaps in what can
//! change live: everything is validated first, then applied.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use svcd_checks::{CheckMetrics, NetworkProbe};
use svcd_config::{AdminListen, Config, Sources};
use svcd_dns::DnsServer;
use svcd_lb::{LbMetrics, LoadBalancer};
use svcd_lifecycle::Phase;
use svcd_proxy::fds::FdBudget;
use svcd_proxy::http::HttpProxy;
use svcd_proxy::workers::ProxyWorkers;
use svcd_proxy::L4Proxy;
use svcd_registry::{InstanceKey, Registry, SyncOptions};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::admin::{self, AdminSocket, AdminState, Surface};
use crate::logging::{self, LogControl};
use crate::metrics::DaemonMetrics;
use crate::notify;
use crate::readiness::Readiness;
use crate::restart_keys;

fn read_token(config: &Config) -> anyhow::Result<Option<String>> {
    let Some(path) = &config.admin.token_file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("admin.token_file: cannot read {}", path.display()))?;
    let token = token.trim().to_string();
    anyhow::ensure!(
        !token.is_empty(),
        "admin.token_file: {} is empty",
        path.display()
    );
    Ok(Some(token))
}

/// A proxy holds two descriptors per connection: lift the soft open-files limit to the hard one,
/// as HAProxy and nginx do, so `proxy.max_connections` is not capped by a 1024 default.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

pub async fn run(sources: Sources) -> anyhow::Result<()> {
    raise_nofile_limit();
    let config = match sources.load() {
        Ok(c) => c,
        Err(e) => {
            for line in e.lines() {
                eprintln!("svcd: {line}");
            }
            anyhow::bail!("invalid configuration");
        }
    };
    let log = logging::init(&config.log);
    let token = read_token(&config)?;
    let metrics = DaemonMetrics::new()?;
    let tls_metrics = svcd_tls::TlsMetrics::register(&metrics.registry)?;
    let store = Registry::open_store(&config.registry).await?;
    let registry = Arc::new(Registry::new(
        store.clone(),
        &config.registry,
        &metrics.registry,
    )?);
    registry
        .keeper
        .adopt(config.registry.static_instances.iter().filter_map(|s| {
            InstanceKey::new(&s.namespace, &s.service, &s.id)
                .ok()
                .map(|key| (key, s.instance.clone()))
        }))
        .await;

    // The daemon's phases, in the order they stop (see the module header).
    let http_phase = Phase::new("http proxy");
    let l4_phase = Phase::new("l4 proxy");
    let workers_phase = Phase::new("proxy workers");
    let answer = Phase::new("dns and admin");
    let registry_phase = Phase::new("registry");
    let sync_options = SyncOptions {
        resync_interval: config.registry.resync_interval,
        ..SyncOptions::default()
    };
    registry.spawn(&registry_phase, sync_options);
    registry_phase.spawn(svcd_checks::run(
        registry.keeper.clone(),
        Arc::new(NetworkProbe::default()),
        CheckMetrics::new(&metrics.registry)?,
        registry.reader().changes(),
        registry_phase.token(),
    ));

    let readiness = Arc::new(Readiness::new(registry.status.clone()));
    let admin_socket = AdminSocket::bind(&config.admin.listen, "admin.listen").await?;
    let admin_addr = admin_socket.describe();
    let scrape_socket = match config.admin.metrics_listen {
        Some(addr) => {
            Some(AdminSocket::bind(&AdminListen::Tcp(addr), "admin.metrics_listen").await?)
        }
        None => None,
    };
    let consul_socket = match config.consul.listen {
        Some(addr) => Some(AdminSocket::bind(&AdminListen::Tcp(addr), "consul.listen").await?),
        None => None,
    };
    // The xDS control plane: streams end with the DNS and admin phase, after the proxies drained
    // (Envoys keep their clusters while this node drains).
    let xds = match &config.xds.listen {
        Some(listen) => {
            let xds = svcd_xds::XdsServer::start(
                &config.xds,
                listen,
                &config.dns.domain,
                registry.reader(),
                registry.status.clone(),
                &metrics.registry,
                &tls_metrics,
                &answer,
            )
            .await?;
            info!(addr = %xds.addr(), "xDS server (ADS, CDS, EDS)");
            Some(Arc::new(xds))
        }
        None => None,
    };
    let advertise_ip = advertise_ip(&config.registry);
    info!(%advertise_ip, "registrations without an IP publish this address");
    let config = Arc::new(ArcSwap::from_pointee(config));
    let admin_state = Arc::new(AdminState {
        advertise_ip,
        pending_restart: ArcSwap::from_pointee(Vec::new()),
        blocking_queries: metrics.blocking_queries.clone(),
        config: config.clone(),
        token: ArcSwap::from_pointee(token),
        readiness: readiness.clone(),
        prometheus: metrics.registry.clone(),
        registry: registry.clone(),
        consul_blocking: crate::consul::BlockingSlots::new(&metrics.registry)?,
        xds: xds.clone(),
    });
    // The admin listeners' TLS (restart-only: they are bound once), each its own series.
    let admin_tls = |listener: &str, tls: Option<(&svcd_config::TlsServerConfig, &str)>| {
        tls.map(|(spec, key)| {
            svcd_tls::ServerTls::new(listener, key, spec, svcd_tls::Alpn::Http1, &tls_metrics)
        })
        .transpose()
    };
    let admin_config = config.load().admin.clone();
    let api_tls = admin_tls("admin", admin_config.tls.as_ref().map(|t| (t, "admin.tls")))?;
    answer.spawn(admin::serve(
        admin_socket,
        admin_state.clone(),
        Surface::Api,
        answer.clone(),
        api_tls.clone(),
    ));
    let mut scrape_tls = None;
    if let Some(socket) = scrape_socket {
        info!(addr = %socket.describe(), "metrics listener (/metrics, /healthz, /readyz, /v1/prometheus/sd)");
        scrape_tls = admin_tls("metrics", admin_config.scrape_tls())?;
        answer.spawn(admin::serve(
            socket,
            admin_state.clone(),
            Surface::Scrape,
            answer.clone(),
            scrape_tls.clone(),
        ));
    }
    // The xDS listener's TLS is re-read with the admin listeners'.
    let admin_tls: Vec<_> = api_tls
        .into_iter()
        .chain(scrape_tls)
        .chain(xds.as_ref().and_then(|x| x.tls()))
        .collect();

    if let Some(socket) = consul_socket {
        info!(addr = %socket.describe(), "Consul-compatible API");
        answer.spawn(admin::serve(
            socket,
            admin_state.clone(),
            Surface::Consul,
            answer.clone(),
            // Plain HTTP: Consul clients on the node reach it on loopback (docs/consul.md).
            None,
        ));
    }

    let current = config.load_full();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let workers = current.dns.workers.unwrap_or(cores);
    let dns = DnsServer::start(
        &current.dns,
        workers,
        registry.reader(),
        &metrics.registry,
        &answer,
    )
    .await?;
    dns.responder.set_consul(&current.consul);
    // The one owner of endpoint health, for the daemon's lifetime (reloads reconfigure it).
    let lb = LoadBalancer::new(
        registry.publisher(),
        current.proxy.outlier.clone(),
        LbMetrics::new(&metrics.registry)?,
    );
    registry_phase.spawn(lb.clone().run(registry_phase.token()));
    // What the proxies may hold open; the rest of RLIMIT_NOFILE stays for admin and DNS.
    let fds = FdBudget::from_rlimit(&metrics.registry)?;
    // The proxies' threads: one current-thread runtime each, every TCP listener bound once per
    // worker (SO_REUSEPORT).
    let proxy_workers = Arc::new(ProxyWorkers::start(
        current.proxy.workers.unwrap_or(cores),
        &workers_phase,
    )?);
    // TLS to instances ([[proxy.upstream_tls]]), shared by both proxies.
    let proxy_tls = svcd_proxy::ProxyTls::new(tls_metrics.clone());
    if let Some(e) = proxy_tls
        .apply(&current.proxy.upstream_tls)
        .into_iter()
        .next()
    {
        return Err(e.into());
    }
    let proxy = L4Proxy::start(
        &current.proxy,
        current.shutdown.drain_timeout,
        &lb,
        &fds,
        &proxy_workers,
        &l4_phase,
        &metrics.registry,
        &proxy_tls,
    )
    .await?;
    let http = HttpProxy::start(
        &current.proxy,
        &current.dns.domain,
        &lb,
        &fds,
        &proxy_workers,
        &http_phase,
        &metrics.registry,
        &proxy_tls,
    )
    .await?;
    // Every TLS listener's files, re-read on SIGHUP and when they change on disk.
    let tls = svcd_tls::TlsReloader::new(std::time::Duration::from_millis(500));
    tls.set(tls_items(&admin_tls, &http, &proxy_tls));
    answer.spawn(tls.clone().watch(answer.token()));
    readiness.listeners_bound.store(true, Ordering::Relaxed);
    notify::spawn(readiness.clone(), &answer);
    info!(admin = %admin_addr, dns = %dns.addr, store = %store.describe(), "svcd started");

    let live = LiveParts {
        admin: &admin_state,
        lb: &lb,
        dns: &dns,
        proxy: &proxy,
        http: &http,
        store: registry.store.as_ref(),
        tls: &tls,
        admin_tls: &admin_tls,
        proxy_tls: &proxy_tls,
    };
    wait_for_signals(&sources, &config, &live, &log, &metrics).await?;

    // Shutdown, in order: stop being chosen, keep serving through the grace, drain the proxies
    // while DNS and the admin API still answer, then stop those and revoke the lease.
    let shutdown = config.load().shutdown.clone();
    info!(
        grace = ?shutdown.readiness_grace,
        drain_timeout = ?shutdown.drain_timeout,
        "shutting down: not ready, registrations draining"
    );
    readiness.shutting_down.store(true, Ordering::Relaxed);
    notify::stopping();
    let second_signal = async {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    };
    let drain = async {
        // Other nodes stop sending here (bounded: a store that does not answer delays nothing
        // beyond the grace).
        let marking = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            registry.keeper.drain_all(),
        );
        match marking.await {
            Ok(Ok(keys)) if !keys.is_empty() => {
                info!(registrations = keys.len(), "marked draining in the store")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "could not mark registrations draining"),
            Err(_) => warn!("marking registrations draining timed out"),
        }
        tokio::time::sleep(shutdown.readiness_grace).await;
        info!("no new connections; draining in-flight work");
        proxy.stop_accepting();
        http.stop_accepting();
        let deadline = tokio::time::Instant::now() + shutdown.drain_timeout;
        tokio::join!(
            proxy.drain(shutdown.drain_timeout),
            http.drain(shutdown.drain_timeout)
        );
        workers_phase.stop().await;
        // DNS and the admin API answered through the drain; now they stop too (DNS waits for
        // its threads in a task of the phase).
        answer.spawn(dns.shutdown());
        let left = deadline.max(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
        if answer
            .stop_within(left - tokio::time::Instant::now())
            .await
            .is_err()
        {
            warn!("drain timeout reached; closing remaining admin connections");
        }
        // Lease revoke is bounded inside the keeper; this bounds everything else.
        let _ = registry_phase
            .stop_within(std::time::Duration::from_secs(3))
            .await;
    };
    let phases = [
        &http_phase,
        &l4_phase,
        &workers_phase,
        &answer,
        &registry_phase,
    ];
    tokio::select! {
        _ = drain => {
            let left: Vec<String> = phases
                .iter()
                .map(|p| format!("{}: {}", p.name(), p.live()))
                .collect();
            let all_ended = phases.iter().all(|p| p.live() == 0);
            info!(all_ended, left = %left.join(", "), "svcd stopped");
        }
        _ = second_signal => {
            warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
    Ok(())
}

/// The running parts whose settings a reload changes in place.
struct LiveParts<'a> {
    admin: &'a AdminState,
    lb: &'a LoadBalancer,
    dns: &'a DnsServer,
    proxy: &'a L4Proxy,
    http: &'a HttpProxy,
    /// Re-reads its credentials and certificates on reload.
    store: &'a dyn svcd_registry::store::Store,
    /// Re-reads every TLS listener's certificates, keys and CAs.
    tls: &'a svcd_tls::TlsReloader,
    /// The admin listeners' TLS (fixed until restart).
    admin_tls: &'a [Arc<svcd_tls::ServerTls>],
    /// TLS to instances, rebuilt for changed `[[proxy.upstream_tls]]` entries.
    proxy_tls: &'a svcd_proxy::ProxyTls,
}

/// What the TLS reloader re-reads: the admin listeners' and the HTTP listeners' TLS.
fn tls_items(
    admin: &[Arc<svcd_tls::ServerTls>],
    http: &HttpProxy,
    upstream: &svcd_proxy::ProxyTls,
) -> Vec<Arc<dyn svcd_tls::Reload>> {
    admin
        .iter()
        .cloned()
        .chain(http.tls())
        .map(|t| t as Arc<dyn svcd_tls::Reload>)
        .chain(
            upstream
                .upstreams()
                .into_iter()
                .map(|t| t as Arc<dyn svcd_tls::Reload>),
        )
        .collect()
}

/// Returns on the first SIGTERM/SIGINT; handles SIGHUP reloads meanwhile.
async fn wait_for_signals(
    sources: &Sources,
    config: &Arc<ArcSwap<Config>>,
    live: &LiveParts<'_>,
    log: &LogControl,
    metrics: &DaemonMetrics,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                notify::reloading();
                match reload(sources, config, live, log).await {
                    Ok(Reloaded::Whole) => metrics.reloads_ok.inc(),
                    Ok(Reloaded::ExceptListeners(lines)) => {
                        metrics.reloads_partial.inc();
                        for line in &lines {
                            error!(error = %line, "config reloaded except this listener, which is not running");
                        }
                    }
                    Err(lines) => {
                        metrics.reloads_failed.inc();
                        for line in &lines {
                            error!(error = %line, "config reload rejected; keeping the running config");
                        }
                        // The running listeners' certificates are still re-read: a SIGHUP after
                        // a rotation must not wait for a config file that parses (each file
                        // that does not load keeps its listener's old material, counted).
                        for e in live.tls.reload_all() {
                            error!(error = %e, "certificate reload");
                        }
                    }
                }
                notify::reloaded();
            }
        }
    }
}

/// The address registrations without an IP get: configured, else (etcd: other nodes must reach
/// it) the source address the kernel picks for the default route, else loopback.
fn advertise_ip(registry: &svcd_config::RegistryConfig) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv4Addr, UdpSocket};
    if let Some(ip) = registry.advertise_ip {
        return ip;
    }
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    if registry.backend == svcd_config::Backend::Embedded {
        return loopback;
    }
    // Connecting a UDP socket sends nothing; it only asks the routing table for a source.
    let detected = UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip());
    match detected {
        Ok(ip) if !ip.is_unspecified() => ip,
        _ => {
            warn!("cannot detect this node's address; set registry.advertise_ip (using 127.0.0.1, which other nodes cannot reach)");
            loopback
        }
    }
}

/// How much of a reload took effect.
enum Reloaded {
    Whole,
    /// Everything but these listeners, which could not bind (their errors, with key paths).
    ExceptListeners(Vec<String>),
}

/// Validates everything first (the config, the token file, the log filter, the store's
/// credential files); any error rejects the reload with nothing applied. Then applies it: the
/// only step that can fail then is binding a new listener, and the answer names each one that
/// is not running; everything else has taken effect.
async fn reload(
    sources: &Sources,
    config: &Arc<ArcSwap<Config>>,
    live: &LiveParts<'_>,
    log: &LogControl,
) -> Result<Reloaded, Vec<String>> {
    let new = sources.load().map_err(|e| e.lines())?;
    let mut invalid = Vec::new();
    let token = read_token(&new)
        .map_err(|e| invalid.push(e.to_string()))
        .ok();
    if let Err(e) = LogControl::check_level(&new.log.level) {
        invalid.push(e);
    }
    if !invalid.is_empty() {
        return Err(invalid);
    }
    let token = token.flatten();
    // The running config's files (their paths change on restart only): rotated certificates
    // and credentials are used by the next connection. Read and checked whole before they
    // replace the old ones, so a failure here leaves everything as it was.
    live.store
        .reload_credentials()
        .await
        .map_err(|e| vec![e.to_string()])?;
    // Applying.
    log.set_level(&new.log.level).map_err(|e| vec![e])?;
    let old = config.load_full();
    let (new, pending) = restart_keys::split(&old, new);
    for p in &pending {
        warn!(
            key = %p.key,
            running = %p.running,
            pending = %p.pending,
            "changed in the config file; takes effect on restart"
        );
    }
    live.admin.pending_restart.store(Arc::new(pending));
    live.admin.token.store(Arc::new(token));
    live.dns.responder.set_consul(&new.consul);
    live.dns.reconfigure(&new.dns);
    live.lb.reconfigure(new.proxy.outlier.clone());
    let mut bind_errors: Vec<String> = live
        .proxy
        .reconfigure(&new.proxy, new.shutdown.drain_timeout)
        .await
        .iter()
        .map(|e| e.to_string())
        .collect();
    // Before the HTTP proxy rebuilds its pools with it.
    bind_errors.extend(
        live.proxy_tls
            .apply(&new.proxy.upstream_tls)
            .iter()
            .map(|e| e.to_string()),
    );
    bind_errors.extend(
        live.http
            .reconfigure(&new.proxy, &new.dns.domain)
            .await
            .into_iter()
            .map(|e| e.to_string()),
    );
    // Rotated certificates: a file that does not load keeps its listener's old material.
    live.tls
        .set(tls_items(live.admin_tls, live.http, live.proxy_tls));
    bind_errors.extend(live.tls.reload_all().iter().map(|e| e.to_string()));
    config.store(Arc::new(new));
    if !bind_errors.is_empty() {
        // The rest of the new configuration is live; the listeners that could not bind are not.
        return Ok(Reloaded::ExceptListeners(bind_errors));
    }
    match sources.file_path() {
        Some(file) => info!(file = %file.display(), "configuration reloaded"),
        None => info!(
            "SIGHUP: svcd runs without --config, so no config file was re-read; token, \
             credential and certificate files were"
        ),
    }
    Ok(Reloaded::Whole)
}
