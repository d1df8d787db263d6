//! Settings a reload cannot apply — listen addresses and the registry — keep their running
//! value until a restart. A reload that changes them names each key in the log, and
//! `/v1/config` shows the running value with the file's pending one beside it.

use serde_json::Value;
use svcd_config::Config;

/// One key whose new value waits for a restart.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PendingKey {
    pub key: String,
    pub running: Value,
    pub pending: Value,
}

/// `new` as it can run now (the restart-only settings kept from `old`), and what differs.
pub fn split(old: &Config, mut new: Config) -> (Config, Vec<PendingKey>) {
    let mut pending = Vec::new();
    diff(
        "admin.listen",
        &json(&old.admin.listen),
        &json(&new.admin.listen),
        &mut pending,
    );
    diff(
        "admin.metrics_listen",
        &json(&old.admin.metrics_listen),
        &json(&new.admin.metrics_listen),
        &mut pending,
    );
    diff(
        "admin.tls",
        &json(&old.admin.tls),
        &json(&new.admin.tls),
        &mut pending,
    );
    diff(
        "admin.metrics_tls",
        &json(&old.admin.metrics_tls),
        &json(&new.admin.metrics_tls),
        &mut pending,
    );
    diff(
        "dns.listen",
        &json(&old.dns.listen),
        &json(&new.dns.listen),
        &mut pending,
    );
    diff(
        "registry",
        &json(&old.registry),
        &json(&new.registry),
        &mut pending,
    );
    diff(
        "proxy.workers",
        &json(&old.proxy.workers),
        &json(&new.proxy.workers),
        &mut pending,
    );
    diff(
        "consul.listen",
        &json(&old.consul.listen),
        &json(&new.consul.listen),
        &mut pending,
    );
    // The whole [xds] section: its listener, TLS spec and bounds are set when it binds.
    diff("xds", &json(&old.xds), &json(&new.xds), &mut pending);
    new.xds = old.xds.clone();
    new.consul.listen = old.consul.listen;
    new.proxy.workers = old.proxy.workers;
    new.admin.listen = old.admin.listen.clone();
    new.admin.metrics_listen = old.admin.metrics_listen;
    new.admin.tls = old.admin.tls.clone();
    new.admin.metrics_tls = old.admin.metrics_tls.clone();
    new.dns.listen = old.dns.listen.clone();
    new.registry = old.registry.clone();
    (new, pending)
}

fn json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("config values serialize")
}

/// Every leaf key under `path` whose value differs (tables compared key by key; lists whole).
fn diff(path: &str, old: &Value, new: &Value, out: &mut Vec<PendingKey>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let x = a.get(key).unwrap_or(&Value::Null);
                let y = b.get(key).unwrap_or(&Value::Null);
                diff(&format!("{path}.{key}"), x, y, out);
            }
        }
        (a, b) if a != b => out.push(PendingKey {
            key: path.to_string(),
            running: a.clone(),
            pending: b.clone(),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        svcd_config::Sources::new()
            .file_text(text)
            .load()
            .expect("valid config")
    }

    #[test]
    fn restart_only_keys_keep_running_values_and_are_named_one_by_one() {
        let old = config("[registry]\nlease_ttl = \"10s\"\n");
        let new = config(
            "[dns]\nlisten = \"127.0.0.1:5353\"\nttl = \"9s\"\n[registry]\nlease_ttl = \"20s\"\n\
             [registry.etcd]\nendpoints = [\"e:2379\"]\n",
        );
        let (running, pending) = split(&old, new);
        let keys: Vec<&str> = pending.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "dns.listen",
                "registry.backend",
                "registry.etcd.endpoints",
                "registry.lease_ttl"
            ]
        );
        assert_eq!(pending[3].running, "10s");
        assert_eq!(pending[3].pending, "20s");
        // The live part of the reload applies; the rest runs as before.
        assert_eq!(running.dns.ttl, std::time::Duration::from_secs(9));
        assert_eq!(running.dns.listen, old.dns.listen);
        assert_eq!(running.registry, old.registry);
    }
}
