//! A listener's material on its own: SNI choice, the checks a file must pass, reload keeping
//! the old material on a bad file, and the series that follow it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use svcd_config::{CertKeyFiles, TlsServerConfig};

use super::*;

/// A CA and leaf certificates it signs, written to a directory.
struct Pki {
    dir: tempfile::TempDir,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test ca");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.clone().self_signed(&ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir,
            ca_params: params,
            ca_key,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `name.crt` and `name.key` for `sans`, valid now or (`days` < 0) expired since 2021.
    fn leaf(&self, name: &str, sans: &[&str], days: i64) -> CertKeyFiles {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = if days < 0 {
            rcgen::date_time_ymd(2021, 1, 1)
        } else {
            rcgen::date_time_ymd(2090, 1, 1 + days as u8 % 28)
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let files = CertKeyFiles {
            cert: self.path(&format!("{name}.crt")),
            key: self.path(&format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

fn spec(certs: Vec<CertKeyFiles>) -> TlsServerConfig {
    TlsServerConfig {
        certs,
        client_ca: None,
        allow: Vec::new(),
        handshake_timeout: Duration::from_secs(5),
    }
}

fn metric(metrics: &TlsMetrics, name: &str) -> Vec<(Vec<String>, f64)> {
    let registry = prometheus::Registry::new();
    registry.register(Box::new(metrics.expiry.clone())).unwrap();
    registry
        .register(Box::new(metrics.reloads.clone()))
        .unwrap();
    registry
        .gather()
        .into_iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| {
            f.get_metric()
                .iter()
                .map(|m| {
                    let labels = m
                        .get_label()
                        .iter()
                        .map(|l| l.value().to_string())
                        .collect();
                    let v = if m.get_gauge().get_value() != 0.0 {
                        m.get_gauge().get_value()
                    } else {
                        m.get_counter().get_value()
                    };
                    (labels, v)
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn chosen_names(tls: &ServerTls, sni: Option<&str>) -> Vec<String> {
    let config = tls.current.load_full();
    let _ = config;
    let certs = tls
        .spec
        .certs
        .iter()
        .map(|f| load_cert("t", f, &crate::provider()).unwrap())
        .collect::<Vec<_>>();
    let table = SniCertificates::new(&certs);
    let (key, _) = table.choose(sni);
    crate::material::Leaf::parse(&key.cert[0]).unwrap().dns
}

#[test]
fn sni_picks_exact_then_wildcard_then_the_first_certificate() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.example"], 90);
    let wild = pki.leaf("wild", &["*.svc.example"], 90);
    let tls = ServerTls::new(
        "t",
        "proxy.http[0].tls",
        &spec(vec![a, wild]),
        Alpn::Http,
        &TlsMetrics::unregistered(),
    )
    .unwrap();
    assert_eq!(chosen_names(&tls, Some("a.example")), ["a.example"]);
    assert_eq!(
        chosen_names(&tls, Some("web.svc.example")),
        ["*.svc.example"]
    );
    // One label only, as RFC 6125 wildcards.
    assert_eq!(chosen_names(&tls, Some("x.web.svc.example")), ["a.example"]);
    assert_eq!(chosen_names(&tls, None), ["a.example"]);
    assert_eq!(chosen_names(&tls, Some("other.example")), ["a.example"]);
}

fn error_text(r: Result<Arc<ServerTls>, TlsError>) -> String {
    match r {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_files_are_refused_with_their_key_and_reason() {
    let pki = Pki::new();
    let metrics = TlsMetrics::unregistered();
    let good = pki.leaf("good", &["a.example"], 90);
    let other = pki.leaf("other", &["b.example"], 90);

    let mismatched = CertKeyFiles {
        cert: good.cert.clone(),
        key: other.key.clone(),
    };
    let e = error_text(ServerTls::new(
        "t",
        "proxy.http[0].tls",
        &spec(vec![mismatched]),
        Alpn::Http,
        &metrics,
    ));
    assert!(e.starts_with("proxy.http[0].tls.key: "), "{e}");
    assert!(e.contains("does not go with"), "{e}");

    let expired = pki.leaf("expired", &["a.example"], -1);
    let e = error_text(ServerTls::new(
        "t",
        "proxy.http[0].tls",
        &spec(vec![expired]),
        Alpn::Http,
        &metrics,
    ));
    assert!(e.starts_with("proxy.http[0].tls.cert: "), "{e}");
    assert!(e.contains("expired"), "{e}");

    let garbage = pki.path("garbage.crt");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let e = error_text(ServerTls::new(
        "t",
        "admin.tls",
        &spec(vec![CertKeyFiles {
            cert: garbage,
            key: good.key.clone(),
        }]),
        Alpn::Http,
        &metrics,
    ));
    assert!(e.starts_with("admin.tls.cert: "), "{e}");

    let missing = CertKeyFiles {
        cert: Path::new("/nonexistent/x.crt").into(),
        key: good.key.clone(),
    };
    let e = error_text(ServerTls::new(
        "t",
        "admin.tls",
        &spec(vec![missing]),
        Alpn::Http,
        &metrics,
    ));
    assert!(e.contains("/nonexistent/x.crt"), "{e}");

    let two = spec(vec![
        good.clone(),
        CertKeyFiles {
            cert: other.cert.clone(),
            key: good.key.clone(),
        },
    ]);
    let e = error_text(ServerTls::new(
        "t",
        "proxy.http[1].tls",
        &two,
        Alpn::Http,
        &metrics,
    ));
    assert!(e.starts_with("proxy.http[1].tls.certs[1].key: "), "{e}");
}

#[test]
fn a_bad_file_on_reload_keeps_the_old_material_and_is_counted() {
    let pki = Pki::new();
    let metrics = TlsMetrics::unregistered();
    let files = pki.leaf("web", &["web.example"], 90);
    let tls = ServerTls::new(
        "http/x",
        "proxy.http[0].tls",
        &spec(vec![files.clone()]),
        Alpn::Http,
        &metrics,
    )
    .unwrap();
    let before = tls.current.load_full();
    let expiry = metric(&metrics, "svcd_tls_certificate_expiry_timestamp_seconds");
    assert_eq!(expiry.len(), 1);
    assert_eq!(expiry[0].0, ["http/x", "web.example"]);

    // Half-written: a certificate without its new key.
    std::fs::write(&files.key, "-----BEGIN PRIVATE KEY-----\ngarbage\n").unwrap();
    assert!(tls.reload().is_err());
    assert!(
        Arc::ptr_eq(&before, &tls.current.load_full()),
        "the old config stays"
    );
    let reloads = metric(&metrics, "svcd_tls_reloads_total");
    assert!(
        reloads.contains(&(vec!["http/x".into(), "failed".into()], 1.0)),
        "{reloads:?}"
    );

    // A new certificate with another name: swapped, and the series follow it.
    let renewed = pki.leaf("web", &["web2.example"], 120);
    assert_eq!(renewed, files);
    tls.reload().unwrap();
    assert!(!Arc::ptr_eq(&before, &tls.current.load_full()));
    let expiry = metric(&metrics, "svcd_tls_certificate_expiry_timestamp_seconds");
    assert_eq!(expiry.len(), 1, "{expiry:?}");
    assert_eq!(expiry[0].0, ["http/x", "web2.example"]);
    tls.forget();
    assert!(metric(&metrics, "svcd_tls_certificate_expiry_timestamp_seconds").is_empty());
}
