//! Who judged an instance: each proxy plane is its own detector, and every failure run and
//! ejection hold is kept per detector.

/// Who judged an instance: each proxy plane is its own detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detector {
    /// L4 TCP connects (refused, timed out).
    Tcp = 0,
    /// HTTP requests (connect failures, resets, timeouts after the request was sent, 5xx,
    /// malformed responses).
    Http = 1,
}

pub(crate) const DETECTORS: usize = 2;

impl Detector {
    pub fn as_str(self) -> &'static str {
        match self {
            Detector::Tcp => "tcp",
            Detector::Http => "http",
        }
    }

    pub(crate) fn all() -> [Detector; DETECTORS] {
        [Detector::Tcp, Detector::Http]
    }
}
