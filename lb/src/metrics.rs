//! Load-balancer metrics: per service, resolved when the service is first balanced and removed
//! when it leaves the snapshot (its series go away with it).

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::detector::Detector;
use crate::ServiceName;

#[derive(Clone)]
pub struct LbMetrics {
    ejections: IntCounterVec,
    ejected: IntGaugeVec,
    panic: IntGaugeVec,
    panics: IntCounterVec,
}

/// Handles of one service.
pub struct ServiceLbMetrics {
    all: LbMetrics,
    name: ServiceName,
    /// Ejections started, by detector (index = `Detector as usize`).
    pub ejections: [IntCounter; 2],
    pub ejected: IntGauge,
    pub panic: IntGauge,
    pub panics: IntCounter,
}

impl LbMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = LbMetrics {
            ejections: IntCounterVec::new(
                Opts::new(
                    "svcd_outlier_ejections_total",
                    "Ejections started by this node's passive health, by service and detector.",
                ),
                &["service", "detector"],
            )?,
            ejected: IntGaugeVec::new(
                Opts::new(
                    "svcd_outlier_ejections_active",
                    "Instances of the service currently ejected on this node.",
                ),
                &["service"],
            )?,
            panic: IntGaugeVec::new(
                Opts::new(
                    "svcd_lb_panic",
                    "1 while the service is below its panic threshold.",
                ),
                &["service"],
            )?,
            panics: IntCounterVec::new(
                Opts::new(
                    "svcd_lb_panic_total",
                    "Times the service entered panic (fell below the panic threshold).",
                ),
                &["service"],
            )?,
        };
        registry.register(Box::new(m.ejections.clone()))?;
        registry.register(Box::new(m.ejected.clone()))?;
        registry.register(Box::new(m.panic.clone()))?;
        registry.register(Box::new(m.panics.clone()))?;
        Ok(m)
    }

    /// Registered nowhere (unit tests, benchmarks).
    pub fn detached() -> Self {
        Self::new(&Registry::new()).expect("a fresh registry accepts the metrics")
    }

    pub fn service(&self, name: &ServiceName) -> ServiceLbMetrics {
        let s = name.as_str();
        ServiceLbMetrics {
            all: self.clone(),
            name: name.clone(),
            ejections: [Detector::Tcp, Detector::Http]
                .map(|d| self.ejections.with_label_values(&[s, d.as_str()])),
            ejected: self.ejected.with_label_values(&[s]),
            panic: self.panic.with_label_values(&[s]),
            panics: self.panics.with_label_values(&[s]),
        }
    }
}

impl Drop for ServiceLbMetrics {
    fn drop(&mut self) {
        let s = self.name.as_str();
        for d in [Detector::Tcp, Detector::Http] {
            let _ = self.all.ejections.remove_label_values(&[s, d.as_str()]);
        }
        let _ = self.all.ejected.remove_label_values(&[s]);
        let _ = self.all.panic.remove_label_values(&[s]);
        let _ = self.all.panics.remove_label_values(&[s]);
    }
}
