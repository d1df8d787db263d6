//! How an instance is chosen, apart from whose health allows it: the weighted schedule (smooth
//! weighted round robin as a precomputed sequence, shared by the proxies' round robin and DNS's
//! answer rotation) and least request (power of two choices, weight-aware). Pure functions of
//! weights and loads: the balancer ([`crate::balancer`]) feeds them its views.

mod least_request;
mod weighted;

pub use least_request::least_request;
pub use weighted::WeightedSchedule;
