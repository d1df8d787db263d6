//! The TLS series (docs/metrics.md): handshakes by listener, result and version; failures by
//! reason; each served certificate's expiry; reloads by result.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// Why a handshake failed, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not done within the listener's `handshake_timeout` (a ClientHello dribbled, a client
    /// that connects and says nothing).
    Timeout,
    /// SNI passthrough: no `[[proxy.tcp.sni]]` name matched and the listener has no service.
    NoSniMatch,
    /// The client's certificate was missing, expired, or not from `client_ca`.
    BadCertificate,
    /// Not TLS (plaintext HTTP, random bytes), a version or cipher svcd does not speak (TLS 1.0),
    /// a malformed or oversized message.
    Protocol,
    /// The client sent an alert: it refused this listener's certificate, most often.
    PeerAlert,
    /// The client closed or reset the connection mid-handshake.
    Closed,
}

impl Failure {
    pub const ALL: [Failure; 6] = [
        Failure::Timeout,
        Failure::NoSniMatch,
        Failure::BadCertificate,
        Failure::Protocol,
        Failure::PeerAlert,
        Failure::Closed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::NoSniMatch => "no_sni_match",
            Failure::BadCertificate => "bad_certificate",
            Failure::Protocol => "protocol",
            Failure::PeerAlert => "peer_alert",
            Failure::Closed => "closed",
        }
    }

    /// What a failed handshake's error says about who failed.
    pub fn of(error: &std::io::Error) -> Failure {
        use rustls::Error as E;
        if let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<E>()) {
            return match tls {
                E::InvalidCertificate(_) | E::NoCertificatesPresented => Failure::BadCertificate,
                E::AlertReceived(_) => Failure::PeerAlert,
                _ => Failure::Protocol,
            };
        }
        match error.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe => Failure::Closed,
            std::io::ErrorKind::TimedOut => Failure::Timeout,
            _ => Failure::Protocol,
        }
    }
}

/// Cloned into every listener's [`crate::ServerTls`]; the vectors are shared.
#[derive(Clone)]
pub struct TlsMetrics {
    /// `svcd_tls_handshakes_total{listener,result,version}`.
    pub(crate) handshakes: IntCounterVec,
    /// `svcd_tls_handshake_failures_total{listener,reason}`.
    pub(crate) failures: IntCounterVec,
    /// `svcd_tls_certificate_expiry_timestamp_seconds{listener,name}`.
    pub(crate) expiry: IntGaugeVec,
    /// `svcd_tls_reloads_total{listener,result}`.
    pub(crate) reloads: IntCounterVec,
}

impl TlsMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<TlsMetrics> {
        let handshakes = IntCounterVec::new(
            Opts::new(
                "svcd_tls_handshakes_total",
                "TLS handshakes by listener, result (ok, failed) and protocol version.",
            ),
            &["listener", "result", "version"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "svcd_tls_handshake_failures_total",
                "Failed TLS handshakes by listener and reason.",
            ),
            &["listener", "reason"],
        )?;
        let expiry = IntGaugeVec::new(
            Opts::new(
                "svcd_tls_certificate_expiry_timestamp_seconds",
                "End of validity (notAfter) of each certificate a listener serves or svcd presents to instances (listener upstream/<svc>.<ns>), in seconds since the epoch.",
            ),
            &["listener", "name"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "svcd_tls_reloads_total",
                "Re-reads of a listener's certificates, keys and CAs by result (ok, failed: the old material kept).",
            ),
            &["listener", "result"],
        )?;
        registry.register(Box::new(handshakes.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(expiry.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        Ok(TlsMetrics {
            handshakes,
            failures,
            expiry,
            reloads,
        })
    }

    /// A handshake that completed on `listener`, by the version it negotiated.
    pub(crate) fn handshake_ok(&self, listener: &str, version: Option<rustls::ProtocolVersion>) {
        let version = match version {
            Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
            _ => "other",
        };
        self.handshakes
            .with_label_values(&[listener, "ok", version])
            .inc();
    }

    /// A handshake `listener` gave up, and why.
    pub(crate) fn handshake_failed(&self, listener: &str, reason: Failure) {
        self.handshakes
            .with_label_values(&[listener, "failed", "none"])
            .inc();
        self.failures
            .with_label_values(&[listener, reason.label()])
            .inc();
    }

    /// Removes `listener`'s handshake, failure and reload series (it is gone); expiry series are
    /// its certificates' and go with them.
    pub(crate) fn forget(&self, listener: &str) {
        for (result, version) in [
            ("ok", "1.3"),
            ("ok", "1.2"),
            ("ok", "other"),
            ("failed", "none"),
            ("passed_through", "none"),
        ] {
            let _ = self
                .handshakes
                .remove_label_values(&[listener, result, version]);
        }
        for reason in Failure::ALL {
            let _ = self
                .failures
                .remove_label_values(&[listener, reason.label()]);
        }
        for result in ["ok", "failed"] {
            let _ = self.reloads.remove_label_values(&[listener, result]);
        }
    }

    /// A registry of its own, for tests and tools.
    pub fn unregistered() -> TlsMetrics {
        TlsMetrics::register(&Registry::new()).expect("fresh registry")
    }
}
