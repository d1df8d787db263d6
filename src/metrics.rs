//! The daemon's one `prometheus::Registry` and the metrics the binary itself owns.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct DaemonMetrics {
    pub registry: Registry,
    pub reloads_ok: IntCounter,
    pub reloads_failed: IntCounter,
    /// Reloads applied except for listeners that could not bind.
    pub reloads_partial: IntCounter,
    /// Admin blocking queries (`?index=`) parked until their service changes: the admin API's
    /// one piece of per-client waiting state, shown so an operator sees who holds it.
    pub blocking_queries: IntGauge,
}

impl DaemonMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let build = IntGauge::with_opts(
            Opts::new("svcd_build_info", "Build information; always 1.")
                .const_label("version", env!("CARGO_PKG_VERSION"))
                .const_label("revision", env!("SVCD_REVISION"))
                .const_label(
                    "profile",
                    if cfg!(debug_assertions) {
                        "debug"
                    } else {
                        "release"
                    },
                ),
        )?;
        build.set(1);
        registry.register(Box::new(build))?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "svcd_config_reloads_total",
                "Configuration reloads (SIGHUP) by result.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        let blocking_queries = IntGauge::new(
            "svcd_admin_blocking_queries",
            "Admin API blocking queries (?index=) waiting for their service to change now.",
        )?;
        registry.register(Box::new(blocking_queries.clone()))?;
        Ok(DaemonMetrics {
            blocking_queries,
            registry,
            reloads_ok: reloads.with_label_values(&["ok"]),
            reloads_failed: reloads.with_label_values(&["failed"]),
            reloads_partial: reloads.with_label_values(&["partial"]),
        })
    }
}
