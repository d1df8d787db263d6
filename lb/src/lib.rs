//! svcd load balancing: the one owner of endpoint health and selection, shared by the TCP, UDP
//! and HTTP proxies.
//!
//! ```text
//!  registry snapshot ──(publish)──► LoadBalancer::run ── prune: instances and services that left
//!        ▲                              │                 (their health, slots and metric series)
//!        │ set_ejection                 │ DelayQueue: ejection ends
//!  SnapshotPublisher ◄── eject/release ─┤
//!                                       ▼
//!  proxy ── BalancerTable<F>::get(service, port) ──► ServiceBalancer::view ─► pick (weighted RR |
//!           (one per plane: L4, HTTP)                 (rebuilt on a new       weighted P2C least
//!                                                      snapshot entry)        request, panic)
//!        ── outcome ──► ServiceBalancer::success / failure (per detector: tcp, http)
//! ```
//!
//! * [`health`]: [`LoadBalancer`] — per-endpoint state that outlives snapshots and reloads
//!   ([`EndpointHealth`]: in-flight count, failure runs, the one ejection record per endpoint
//!   that knows which detectors hold it), the timers that end ejections, pruning.
//! * [`outlier`]: passive health — outcomes, ejection and release. An ejection is published
//!   through the registry's [`SnapshotPublisher`], so DNS, the API, the CLI and metrics read the
//!   same [`ServedState`] the proxies route by.
//! * [`balancer`]: [`BalancerTable`] and [`ServiceBalancer`] — views of a service's usable
//!   instances with a [`WeightedSchedule`], the panic threshold, round robin and least request.
//!   Reconfigured in place on reload: policy and thresholds change, per-endpoint state does not.
//!   A plane attaches its own per-endpoint data (its metric handles) through [`SlotFactory`], so
//!   L4 slots carry no HTTP handles.
//! * [`metrics`]: ejection and panic series, removed with the service they describe.

pub mod balancer;
pub mod detector;
pub mod health;
pub mod load_balancer;
pub mod metrics;
pub mod outlier;
pub mod select;

pub use balancer::{BalancerTable, Pick, PortRule, ServiceBalancer, Slot, SlotFactory, View};
pub use detector::Detector;
pub use health::{EndpointHealth, ServiceHealth};
pub use load_balancer::LoadBalancer;
pub use metrics::LbMetrics;
pub use select::WeightedSchedule;
pub use svcd_registry::{ServedState, ServiceName, SnapshotPublisher};

#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}
