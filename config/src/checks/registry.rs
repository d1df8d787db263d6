//! Checks of the registry settings (`[registry]`, `[registry.etcd]` and its TLS, and
//! `[[registry.static]]` instances).

use std::path::PathBuf;
use std::time::Duration;

use super::Checker;
use crate::instance::Instance;
use crate::model::*;
use crate::names;
use crate::raw::*;

pub(super) fn registry(c: &mut Checker, raw: RawRegistry) -> RegistryConfig {
    let etcd_raw = raw.etcd.unwrap_or_default();
    let backend = match raw.backend.as_deref() {
        None if etcd_raw.endpoints.as_ref().is_some_and(|e| !e.is_empty()) => Backend::Etcd,
        None | Some("embedded") => Backend::Embedded,
        Some("etcd") => Backend::Etcd,
        Some(other) => {
            c.err(
                "registry.backend",
                format!("{other:?} is not one of \"embedded\", \"etcd\""),
            );
            Backend::Embedded
        }
    };
    let endpoints = etcd_raw.endpoints.unwrap_or_default();
    if backend == Backend::Etcd && endpoints.is_empty() {
        c.err(
            "registry.etcd.endpoints",
            "required when registry.backend = \"etcd\"",
        );
    }
    for (i, e) in endpoints.iter().enumerate() {
        let hostport = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .unwrap_or(e);
        let valid = hostport.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            c.err(
                format!("registry.etcd.endpoints[{i}]"),
                format!("invalid endpoint {e:?} (want [http://]HOST:PORT)"),
            );
        }
    }
    let etcd = EtcdConfig {
        endpoints,
        connect_timeout: c.duration(
            "registry.etcd.connect_timeout",
            etcd_raw.connect_timeout,
            Duration::from_secs(5),
        ),
        request_timeout: c.duration(
            "registry.etcd.request_timeout",
            etcd_raw.request_timeout,
            Duration::from_secs(10),
        ),
        keepalive_interval: c.duration(
            "registry.etcd.keepalive_interval",
            etcd_raw.keepalive_interval,
            Duration::from_secs(10),
        ),
        keepalive_timeout: c.duration(
            "registry.etcd.keepalive_timeout",
            etcd_raw.keepalive_timeout,
            Duration::from_secs(5),
        ),
        username: etcd_raw.username,
        password: etcd_raw.password,
        password_file: etcd_raw.password_file.map(PathBuf::from),
        tls: etcd_raw.tls.and_then(|raw| etcd_tls(c, raw)),
    };
    match (
        etcd.username.is_some(),
        etcd.password.is_some(),
        etcd.password_file.is_some(),
    ) {
        (_, true, true) => c.err(
            "registry.etcd.password_file",
            "set either password or password_file, not both",
        ),
        (true, false, false) => c.err(
            "registry.etcd.password",
            "username needs a password: set password_file (or SVCD_ETCD_PASSWORD)",
        ),
        (false, true, _) | (false, _, true) => {
            c.err("registry.etcd.username", "a password needs a username")
        }
        _ => {}
    }
    if etcd.tls.is_some() {
        for (i, e) in etcd.endpoints.iter().enumerate() {
            if e.starts_with("http://") {
                c.err(
                    format!("registry.etcd.endpoints[{i}]"),
                    format!("{e:?} is plaintext but registry.etcd.tls is set (use HOST:PORT or https://)"),
                );
            }
        }
    }
    let lease_ttl = c.duration("registry.lease_ttl", raw.lease_ttl, Duration::from_secs(10));
    if lease_ttl < Duration::from_secs(2) {
        c.err(
            "registry.lease_ttl",
            "must be at least 2s (etcd's minimum lease TTL)",
        );
    }
    let resync_interval = c.duration(
        "registry.resync_interval",
        raw.resync_interval,
        Duration::from_secs(300),
    );
    let node = raw.node.unwrap_or_else(local_hostname);
    let read_only = raw.read_only.unwrap_or(false);
    let advertise_ip = raw.advertise_ip.and_then(|text| match text.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            c.err(
                "registry.advertise_ip",
                format!("{text:?} is not an IP address"),
            );
            None
        }
    });
    if read_only && raw.static_instances.as_ref().is_some_and(|s| !s.is_empty()) {
        c.err(
            "registry.static",
            "a read-only node (registry.read_only = true) owns no registrations",
        );
    }
    let static_instances = raw
        .static_instances
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, table)| static_instance(c, i, table))
        .collect();
    RegistryConfig {
        backend,
        lease_ttl,
        resync_interval,
        node,
        advertise_ip,
        read_only,
        etcd,
        static_instances,
    }
}

fn etcd_tls(c: &mut Checker, raw: RawEtcdTls) -> Option<EtcdTlsConfig> {
    if raw.cert.is_some() != raw.key.is_some() {
        c.err(
            "registry.etcd.tls.key",
            "cert and key must be set together (a client certificate and its key)",
        );
    }
    let Some(ca) = raw.ca else {
        c.err(
            "registry.etcd.tls.ca",
            "required: the CA that signed etcd's certificates",
        );
        return None;
    };
    if raw.server_name.as_deref() == Some("") {
        c.err("registry.etcd.tls.server_name", "must not be empty");
    }
    Some(EtcdTlsConfig {
        ca: PathBuf::from(ca),
        cert: raw.cert.map(PathBuf::from),
        key: raw.key.map(PathBuf::from),
        server_name: raw.server_name,
    })
}

fn static_instance(c: &mut Checker, i: usize, mut table: toml::Table) -> Option<StaticInstance> {
    let base = format!("registry.static[{i}]");
    let mut take = |key: &str| -> Option<String> {
        match table.remove(key) {
            Some(toml::Value::String(s)) => Some(s),
            Some(_) => {
                c.err(format!("{base}.{key}"), "must be a string");
                None
            }
            None => None,
        }
    };
    let service = take("service");
    let id = take("id");
    let mut ok = true;
    let (service, namespace) = match service.as_deref().map(names::parse_service_ref) {
        Some(Ok(pair)) => pair,
        Some(Err(e)) => {
            c.err(format!("{base}.service"), e);
            ok = false;
            Default::default()
        }
        None => {
            c.err(
                format!("{base}.service"),
                "missing (\"<svc>\" or \"<svc>.<ns>\")",
            );
            ok = false;
            Default::default()
        }
    };
    let id = id.unwrap_or_default();
    if let Err(e) = names::check_label(&id) {
        c.err(format!("{base}.id"), format!("instance id {e}"));
        ok = false;
    }
    let instance = match serde_path_to_error::deserialize::<_, Instance>(toml::Value::Table(table))
    {
        Ok(instance) => {
            for e in instance.validate_registration() {
                c.err(format!("{base}.{}", e.path), e.message);
                ok = false;
            }
            Some(instance)
        }
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." {
                base.clone()
            } else {
                format!("{base}.{path}")
            };
            c.err(
                path,
                crate::suggest::unknown_field(e.into_inner().to_string()),
            );
            None
        }
    };
    let instance = instance?;
    ok.then_some(StaticInstance {
        namespace,
        service,
        id,
        instance,
    })
}

fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
