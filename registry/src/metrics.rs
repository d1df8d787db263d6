//! Registry metrics, registered once into the daemon's one `prometheus::Registry`.

use std::fmt::Write;
use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::snapshot::{EndpointSnapshot, ServedState, ServiceEndpoints};
use crate::status::StoreReplaced;

/// Handles resolved at start-up; updating one is an atomic op, never a registry lookup.
#[derive(Clone)]
pub struct RegistryMetrics {
    pub connected: IntGauge,
    pub revision: IntGauge,
    pub snapshot_age_seconds: prometheus::Gauge,
    pub events_put: IntCounter,
    pub events_delete: IntCounter,
    pub relists: IntCounter,
    pub invalid_values: IntCounter,
    pub publishes: IntCounter,
    pub endpoints: IntGauge,
    pub services: IntGauge,
    pub lease_grants: IntCounter,
    pub own_registrations: IntGauge,
    /// `svcd_registry_store_replaced_total{reason}`, in the order of [`StoreReplaced::ALL`].
    pub store_replaced: [IntCounter; 3],
    /// Watch events received → the snapshot holding them published: this daemon's share of a
    /// change's way to DNS and the proxies (the store's commit and delivery are not in it).
    pub event_to_publish_seconds: prometheus::Histogram,
}

impl RegistryMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "svcd_registry_events_total",
                "Watch events applied to the snapshot, by type.",
            ),
            &["type"],
        )?;
        let replaced = IntCounterVec::new(
            Opts::new(
                "svcd_registry_store_replaced_total",
                "Times the store was found wiped or replaced (a history other than the \
                 snapshot's), by how it was told.",
            ),
            &["reason"],
        )?;
        let m = RegistryMetrics {
            connected: IntGauge::new(
                "svcd_registry_connected",
                "1 while the watch on the store is healthy.",
            )?,
            revision: IntGauge::new(
                "svcd_registry_revision",
                "Store revision the snapshot reflects.",
            )?,
            snapshot_age_seconds: prometheus::Gauge::new(
                "svcd_registry_snapshot_age_seconds",
                "Seconds since the snapshot was last confirmed current with the store.",
            )?,
            events_put: events.with_label_values(&["put"]),
            events_delete: events.with_label_values(&["delete"]),
            relists: IntCounter::new(
                "svcd_registry_relists_total",
                "Full listings of the registry (start, compaction, reconciliation).",
            )?,
            invalid_values: IntCounter::new(
                "svcd_registry_invalid_values_total",
                "Keys under the endpoint prefix skipped because their key or value did not parse.",
            )?,
            publishes: IntCounter::new(
                "svcd_registry_snapshot_publishes_total",
                "Snapshots published.",
            )?,
            endpoints: IntGauge::new(
                "svcd_registry_endpoints",
                "Endpoints in the current snapshot.",
            )?,
            services: IntGauge::new(
                "svcd_registry_services",
                "Services in the current snapshot.",
            )?,
            lease_grants: IntCounter::new(
                "svcd_registry_lease_grants_total",
                "Leases granted for this daemon's registrations (first and re-grants).",
            )?,
            own_registrations: IntGauge::new(
                "svcd_registry_own_registrations",
                "Registrations this daemon holds under its lease.",
            )?,
            store_replaced: StoreReplaced::ALL.map(|r| replaced.with_label_values(&[r.as_str()])),
            event_to_publish_seconds: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "svcd_registry_event_to_publish_seconds",
                    "From a burst of watch events received to the snapshot holding them \
                     published (coalescing window included).",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ]),
            )?,
        };
        registry.register(Box::new(events))?;
        registry.register(Box::new(replaced))?;
        for c in [&m.relists, &m.invalid_values, &m.publishes, &m.lease_grants] {
            registry.register(Box::new(c.clone()))?;
        }
        for g in [
            &m.connected,
            &m.revision,
            &m.endpoints,
            &m.services,
            &m.own_registrations,
        ] {
            registry.register(Box::new(g.clone()))?;
        }
        registry.register(Box::new(m.snapshot_age_seconds.clone()))?;
        registry.register(Box::new(m.event_to_publish_seconds.clone()))?;
        Ok(m)
    }

    /// Handles registered nowhere, for unit tests.
    pub fn unregistered() -> Self {
        Self::new(&Registry::new()).expect("fresh registry accepts metrics")
    }
}

/// See [`crate::Registry::write_state_metrics`]. Services are written in name order so scrapes
/// diff cleanly. Above `max_services` services, only those not fully healthy keep their own
/// series (at most `max_services`, in name order); the rest are summed by state under
/// `service="_folded"`, and `svcd_service_series_folded` says how many were folded.
pub fn write_state_metrics(
    snapshot: &EndpointSnapshot,
    out: &mut String,
    per_endpoint: bool,
    max_services: usize,
) {
    // Folding needs no order among the folded: count them in one pass over the services (their
    // counts are kept per service), and sort only what is shown.
    let fold = snapshot.service_count() > max_services;
    let mut folded = [0usize; ServedState::ALL.len()];
    let mut folded_services = 0usize;
    let mut shown = Vec::with_capacity(snapshot.service_count().min(max_services));
    for s in snapshot.services() {
        let counts = s.count_by_state();
        let all_healthy = counts[ServedState::Healthy as usize] == s.all.len();
        if fold && all_healthy {
            folded_services += 1;
            for (sum, n) in folded.iter_mut().zip(counts) {
                *sum += n;
            }
        } else {
            shown.push((s, counts));
        }
    }
    let by_name = |a: &(&Arc<ServiceEndpoints>, _), b: &(&Arc<ServiceEndpoints>, _)| {
        (&a.0.namespace, &a.0.service).cmp(&(&b.0.namespace, &b.0.service))
    };
    if shown.len() > max_services {
        // More not fully healthy services than series: the first in name order keep theirs.
        shown.select_nth_unstable_by(max_services, by_name);
        for (_, counts) in shown.drain(max_services..) {
            folded_services += 1;
            for (sum, n) in folded.iter_mut().zip(counts) {
                *sum += n;
            }
        }
    }
    shown.sort_unstable_by(by_name);
    out.push_str(
        "# HELP svcd_service_endpoints Instances of each service by the state this node serves \
         them with (healthy, unhealthy, draining, ejected, pending); above \
         admin.max_service_series services, service=\"_folded\" sums the fully healthy ones.\n\
         # TYPE svcd_service_endpoints gauge\n",
    );
    if fold {
        for state in ServedState::ALL {
            let _ = writeln!(
                out,
                "svcd_service_endpoints{{service=\"_folded\",state=\"{}\"}} {}",
                state.as_str(),
                folded[state as usize]
            );
        }
    }
    for (s, counts) in &shown {
        for state in ServedState::ALL {
            let _ = writeln!(
                out,
                "svcd_service_endpoints{{service=\"{}.{}\",state=\"{}\"}} {}",
                s.service,
                s.namespace,
                state.as_str(),
                counts[state as usize]
            );
        }
    }
    out.push_str(
        "# HELP svcd_service_series_folded Services whose svcd_service_endpoints series are \
         folded into service=\"_folded\" (more than admin.max_service_series services).\n\
         # TYPE svcd_service_series_folded gauge\n",
    );
    let _ = writeln!(out, "svcd_service_series_folded {folded_services}");
    if !per_endpoint {
        return;
    }
    out.push_str(
        "# HELP svcd_endpoint_state 1 for each endpoint, labelled with the state this node serves \
         it with (opt-in: admin.endpoint_state_series).\n\
         # TYPE svcd_endpoint_state gauge\n",
    );
    for (s, _) in &shown {
        for e in &s.all {
            let _ = writeln!(
                out,
                "svcd_endpoint_state{{service=\"{}.{}\",endpoint=\"{}\",state=\"{}\"}} 1",
                s.service,
                s.namespace,
                e.id,
                s.served_state(e).as_str()
            );
        }
    }
}
