//! The query parameters of the Consul API: the ones svcd honours (`ns`, `dc`, `index`, `wait`,
//! `passing`, `tag`), the ones that change nothing here (`stale`, `consistent`, `cached`,
//! `near`, `pretty`, `token`, ...), and a clear 400 for the ones that would change the answer
//! but are not supported (`filter`, `node-meta`, `peer`, `partition`).

use std::time::Duration;

use svcd_config::ConsulConfig;

use crate::admin::query;

#[derive(Debug, PartialEq)]
pub struct Params {
    /// `?ns=`: svcd's namespace; `default` when absent.
    pub namespace: String,
    /// `?index=`: block until the answer's index differs from it.
    pub index: Option<i64>,
    /// `?wait=`: the longest a blocking query waits (default 5m, at most 10m).
    pub wait: Duration,
    /// `?passing`: only instances whose check is passing (served healthy).
    pub passing: bool,
    /// `?tag=` (repeatable): only instances with every one of these tags.
    pub tags: Vec<String>,
}

/// Accepted and without effect: consistency modes (svcd answers from its snapshot, which is
/// what `stale` gives in Consul), sorting by distance, formatting, and the token (checked
/// before).
const NO_EFFECT: &[&str] = &[
    "stale",
    "consistent",
    "cached",
    "near",
    "pretty",
    "token",
    "merge-central-config",
    "replace-existing-checks",
];

/// Consul's wait: `10s`, `5m`, or a bare number of seconds.
fn parse_wait(text: &str) -> Result<Duration, String> {
    let d = match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(text)
            .map_err(|_| format!("Invalid wait time {text:?} (e.g. \"30s\")"))?,
    };
    Ok(d.min(super::MAX_WAIT))
}

impl Params {
    pub fn parse(text: Option<&str>, config: &ConsulConfig) -> Result<Params, String> {
        let mut p = Params {
            namespace: svcd_config::names::DEFAULT_NAMESPACE.to_string(),
            index: None,
            wait: Duration::from_secs(300),
            passing: false,
            tags: Vec::new(),
        };
        for (k, v) in query::pairs(text) {
            match k.as_str() {
                "ns" if !v.is_empty() => {
                    svcd_config::names::check_label(&v)
                        .map_err(|e| format!("Invalid namespace (ns): {e}"))?;
                    p.namespace = v;
                }
                "ns" => {}
                "dc" => {
                    if !v.is_empty() && !v.eq_ignore_ascii_case(&config.datacenter) {
                        return Err(format!(
                            "No path to datacenter {v:?}: this svcd serves {:?} only",
                            config.datacenter
                        ));
                    }
                }
                "index" => {
                    let index: u64 = v
                        .parse()
                        .map_err(|_| format!("Invalid index {v:?}: want an unsigned integer"))?;
                    p.index = Some(index.min(i64::MAX as u64) as i64);
                }
                "wait" => p.wait = parse_wait(&v)?,
                "passing" => {
                    p.passing = !matches!(v.as_str(), "0" | "false");
                }
                "tag" => p.tags.push(v),
                "filter" | "node-meta" | "peer" | "partition" if !v.is_empty() => {
                    if k == "partition" && v == "default" {
                        continue;
                    }
                    return Err(format!(
                        "?{k}= is not supported by svcd's Consul API (docs/consul.md)"
                    ));
                }
                k if NO_EFFECT.contains(&k) => {}
                "filter" | "node-meta" | "peer" | "partition" => {}
                other => {
                    return Err(format!(
                        "unknown query parameter {other:?}; svcd's Consul API takes ns, dc, \
                         index, wait, passing, tag (and ignores {})",
                        NO_EFFECT.join(", ")
                    ))
                }
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConsulConfig {
        svcd_config::Config::default().consul
    }

    #[test]
    fn consul_clients_queries_parse() {
        let p = Params::parse(
            Some("dc=dc1&stale=&index=42&wait=30s&passing=1&tag=a&tag=b&ns=team"),
            &config(),
        )
        .unwrap();
        assert_eq!(p.index, Some(42));
        assert_eq!(p.wait, Duration::from_secs(30));
        assert!(p.passing);
        assert_eq!(p.tags, ["a", "b"]);
        assert_eq!(p.namespace, "team");
        assert_eq!(
            Params::parse(Some("wait=3600s"), &config()).unwrap().wait,
            Duration::from_secs(600)
        );
        assert_eq!(
            Params::parse(Some("wait=7"), &config()).unwrap().wait,
            Duration::from_secs(7)
        );
    }

    #[test]
    fn what_would_change_the_answer_is_refused_by_name() {
        for (q, word) in [
            ("filter=Service.Tags+contains+%22a%22", "filter"),
            ("dc=eu1", "eu1"),
            ("index=-1", "index"),
            ("wait=soon", "wait"),
            ("bogus=1", "bogus"),
            ("ns=A_B", "namespace"),
        ] {
            let e = Params::parse(Some(q), &config()).unwrap_err();
            assert!(e.contains(word), "{q}: {e}");
        }
    }
}
