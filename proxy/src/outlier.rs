//! Passive health: instances that fail in this node's proxy are ejected from this node.
//!
//! Every proxied request reports its outcome. `consecutive_failures` connect failures or 5xx
//! responses in a row eject the instance for `base_ejection_time × ejections` (capped at ten
//! times the base), unless that would put more than `max_ejection_percent` of the service's
//! instances out at once. An ejection is published through the registry's [`LocalOverlay`], so
//! the local DNS answers drop the instance too; a timer returns it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use svcd_config::OutlierConfig;
use svcd_registry::{Ejection, LocalOverlay};
use tracing::{info, warn};

use crate::balance::{EndpointStats, ServiceBalancer};

/// Where ejections are published and counted.
pub struct OutlierDetector {
    overlay: Option<Arc<LocalOverlay>>,
    ejections_total: IntCounterVec,
    ejections_active: IntGaugeVec,
}

impl OutlierDetector {
    pub fn new(
        overlay: Option<Arc<LocalOverlay>>,
        registry: &Registry,
    ) -> prometheus::Result<Arc<Self>> {
        let ejections_total = IntCounterVec::new(
            Opts::new(
                "svcd_outlier_ejections_total",
                "Instances ejected by this node's proxy (passive health).",
            ),
            &["service"],
        )?;
        let ejections_active = IntGaugeVec::new(
            Opts::new(
                "svcd_outlier_ejections_active",
                "Instances currently ejected by this node's proxy.",
            ),
            &["service"],
        )?;
        registry.register(Box::new(ejections_total.clone()))?;
        registry.register(Box::new(ejections_active.clone()))?;
        Ok(Arc::new(OutlierDetector {
            overlay,
            ejections_total,
            ejections_active,
        }))
    }

    /// A request or connection to `stats` worked: the failure run ends.
    #[inline]
    pub fn success(&self, stats: &EndpointStats) {
        // Read first: no cache-line write on the common path.
        if stats.consecutive_failures.load(Ordering::Relaxed) != 0 {
            stats.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A connect failure, reset or 5xx from `stats`; may eject it.
    pub fn failure(
        self: &Arc<Self>,
        service: &Arc<ServiceBalancer>,
        total: usize,
        stats: &Arc<EndpointStats>,
        config: &OutlierConfig,
        reason: &str,
    ) {
        let run = stats.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if config.consecutive_failures == 0 || run < config.consecutive_failures {
            return;
        }
        let limit = total * config.max_ejection_percent as usize / 100;
        if service.ejected_now.load(Ordering::Relaxed) >= limit {
            return;
        }
        if stats.ejected.swap(true, Ordering::AcqRel) {
            return; // already ejected
        }
        service.ejected_now.fetch_add(1, Ordering::Relaxed);
        let count = stats.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = ejection_time(config, count);
        let reason = format!("{run} consecutive failures, last: {reason}");
        warn!(service = %service.name, endpoint = %stats.id, ?duration, %reason, "instance ejected");
        self.ejections_total
            .with_label_values(&[&service.name])
            .inc();
        self.ejections_active
            .with_label_values(&[&service.name])
            .inc();
        let now = SystemTime::now();
        if let Some(overlay) = &self.overlay {
            overlay.eject(
                &service.name,
                &stats.id,
                Ejection {
                    reason,
                    since: now,
                    until: now + duration,
                    count,
                },
            );
        }
        let (this, service, stats) = (self.clone(), service.clone(), stats.clone());
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            this.restore(&service, &stats);
        });
    }

    fn restore(&self, service: &ServiceBalancer, stats: &EndpointStats) {
        stats.consecutive_failures.store(0, Ordering::Relaxed);
        stats.ejected.store(false, Ordering::Release);
        service.ejected_now.fetch_sub(1, Ordering::Relaxed);
        self.ejections_active
            .with_label_values(&[&service.name])
            .dec();
        if let Some(overlay) = &self.overlay {
            overlay.restore(&service.name, &stats.id);
        }
        info!(service = %service.name, endpoint = %stats.id, "ejection over; instance back");
    }
}

/// Ejection time for the `count`-th ejection.
pub fn ejection_time(config: &OutlierConfig, count: u32) -> Duration {
    config.base_ejection_time * count.min(10)
}
