//! Client commands: `register`, `deregister`, `list`, `resolve`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use svcd_config::names;

use crate::cli::{AdminArgs, InstanceArgs, Output, RegisterArgs};
use crate::client::AdminClient;

/// `NAME=VALUE` pairs from repeated flags.
fn pairs(flag: &str, items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--{flag} {item:?}: expected NAME=VALUE"))
        })
        .collect()
}

/// The `check` object from CLI flags; `default_kind` applies when `--check` is not given.
fn check_json(args: &InstanceArgs, default_kind: Option<&str>) -> Option<Value> {
    let kind = args.check.as_deref().or(default_kind)?;
    if kind == "none" {
        return None;
    }
    let mut check = json!({
        "type": kind,
        "path": args.check_path,
        "interval": args.check_interval,
        "timeout": args.check_timeout,
    });
    if let Some(port) = &args.check_port {
        check["port"] = json!(port);
    }
    Some(check)
}

/// The registration body from CLI flags; the daemon validates it (one set of rules).
/// `default_check` is the check kind used when `--check` is absent (`svcd exec`: tcp).
/// The registration body. Without `--ip` it carries no `ip`: the daemon fills in its advertised
/// address (`registry.advertise_ip`).
pub fn instance_json(args: &InstanceArgs, default_check: Option<&str>) -> anyhow::Result<Value> {
    let mut ports = serde_json::Map::new();
    for (name, port) in pairs("port", &args.ports)? {
        let port: u16 = port
            .parse()
            .map_err(|_| anyhow::anyhow!("--port {name}={port}: port must be 1..=65535"))?;
        ports.insert(name, json!(port));
    }
    let mut v = json!({
        "ports": ports,
        "tags": args.tags,
        "meta": pairs("meta", &args.meta)?,
    });
    if let Some(ip) = args.ip {
        v["ip"] = json!(ip.to_string());
    }
    if let Some(p) = &args.protocol {
        v["protocol"] = json!(p);
    }
    if let Some(w) = args.weight {
        v["weight"] = json!(w);
    }
    if let Some(n) = &args.node {
        v["node"] = json!(n);
    }
    let has_ports = !args.ports.is_empty();
    if let Some(check) = check_json(args, default_check.filter(|_| has_ports)) {
        v["check"] = check;
    }
    Ok(v)
}

/// `svc[.ns]` → API path segment `ns/svc`.
pub fn service_path(service: &str) -> anyhow::Result<String> {
    let (svc, ns) = names::parse_service_ref(service).map_err(anyhow::Error::msg)?;
    Ok(format!("{ns}/{svc}"))
}

pub async fn register(args: RegisterArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.admin)?;
    let mut body = instance_json(&args.instance, None)?;
    if let Some(state) = &args.state {
        body["state"] = json!(state);
    }
    let mut path = format!(
        "/v1/services/{}/instances/{}",
        service_path(&args.service)?,
        args.id
    );
    if let Some(ttl) = &args.ttl {
        path.push_str(&format!("?ttl={ttl}"));
    }
    let resp = client
        .call(Method::PUT, &path, Some(serde_json::to_vec(&body)?))
        .await?;
    println!(
        "registered {}.{}/{} at {}",
        resp["service"].as_str().unwrap_or(""),
        resp["namespace"].as_str().unwrap_or(""),
        args.id,
        resp["ip"].as_str().unwrap_or("")
    );
    Ok(ExitCode::SUCCESS)
}

/// `SERVICE[.NS]/ID` → API path `/v1/services/{ns}/{svc}/instances/{id}`.
fn instance_path(instance: &str) -> anyhow::Result<String> {
    let (service, id) = instance
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("{instance:?}: expected SERVICE[.NS]/ID"))?;
    Ok(format!(
        "/v1/services/{}/instances/{id}",
        service_path(service)?
    ))
}

pub async fn drain(instance: &str, admin: &AdminArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(admin)?;
    client
        .call(
            Method::POST,
            &format!("{}/drain", instance_path(instance)?),
            None,
        )
        .await?;
    println!("draining {instance}");
    Ok(ExitCode::SUCCESS)
}

/// `svcd drain --all`: every registration the local daemon holds.
pub async fn drain_all(admin: &AdminArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(admin)?;
    let v = client.call(Method::POST, "/v1/drain", None).await?;
    println!("draining {} registration(s)", v["drained"]);
    Ok(ExitCode::SUCCESS)
}

pub async fn deregister(instance: &str, admin: &AdminArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(admin)?;
    client
        .call(Method::DELETE, &instance_path(instance)?, None)
        .await?;
    println!("deregistered {instance}");
    Ok(ExitCode::SUCCESS)
}

/// The state an instance is served with here (the API's `served_state`) and why: the ejection
/// (its holders and end), or the registered reason (a failing check's error), or "drained".
fn state_and_why(i: &serde_json::Value) -> (String, String) {
    let state = i["served_state"].as_str().unwrap_or("").to_string();
    let why = match (i.get("ejection"), i["reason"].as_str()) {
        (Some(ej), _) => format!(
            "{} (by {}; until {}, ejection #{})",
            ej["reason"].as_str().unwrap_or(""),
            ej["holders"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            ej["until"].as_str().unwrap_or(""),
            ej["count"]
        ),
        (None, Some(reason)) => reason.to_string(),
        (None, None) if state == "draining" => "drained".into(),
        (None, None) if state == "pending" => "awaiting its first health check".into(),
        _ => String::new(),
    };
    (state, why)
}

pub async fn list(
    service: Option<&str>,
    output: Output,
    admin: &AdminArgs,
) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(admin)?;
    match service {
        None => {
            // Page by page (the daemon answers at most a page at a time).
            let mut services = Vec::new();
            let mut path = "/v1/services".to_string();
            loop {
                let v = client.call(Method::GET, &path, None).await?;
                if v["synced"] == false {
                    eprintln!(
                        "svcd: the daemon has not synced with its registry store yet; no listing"
                    );
                    return Ok(ExitCode::from(2));
                }
                if let Some(page) = v["services"].as_array() {
                    services.extend(page.iter().cloned());
                }
                match v["next"].as_str() {
                    Some(next) => {
                        // Names are DNS labels: only the `/` needs escaping.
                        path = format!("/v1/services?after={}", next.replace('/', "%2F"))
                    }
                    None => break,
                }
            }
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&services)?);
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = Table::new(&["SERVICE", "INSTANCES", "HEALTHY"]);
            for s in &services {
                table.row(vec![
                    format!(
                        "{}.{}",
                        s["service"].as_str().unwrap_or(""),
                        s["namespace"].as_str().unwrap_or("")
                    ),
                    s["instances"].to_string(),
                    s["healthy"].to_string(),
                ]);
            }
            table.print();
        }
        Some(service) => {
            let v = client
                .call(
                    Method::GET,
                    &format!("/v1/services/{}", service_path(service)?),
                    None,
                )
                .await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Table if !has_instances(&v) => eprintln!("{service}: no instances"),
                Output::Table => print_instances(&v),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Rows printed in columns as wide as their widest cell (the last one unpadded).
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn print(&self) {
        let columns = self.rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
                }
            }
            println!("{}", line.trim_end());
        }
    }
}

/// The instance table of `svcd list SERVICE` and `svcd watch`.
fn print_instances(v: &serde_json::Value) {
    let mut table = Table::new(&["ID", "IP", "STATE", "NODE", "PORTS", "WHY"]);
    for i in v["instances"].as_array().into_iter().flatten() {
        let ports: Vec<String> = i["ports"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, p)| format!("{k}={p}"))
            .collect();
        let (state, why) = state_and_why(i);
        table.row(vec![
            i["id"].as_str().unwrap_or("").to_string(),
            i["ip"].as_str().unwrap_or("").to_string(),
            state,
            i["node"].as_str().unwrap_or("").to_string(),
            ports.join(","),
            why,
        ]);
    }
    table.print();
}

/// `svcd watch SERVICE`: the instances now, then after every change (blocking queries on the
/// service's index), until interrupted.
pub async fn watch(service: &str, admin: &AdminArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(admin)?;
    let path = format!("/v1/services/{}", service_path(service)?);
    let mut index: Option<i64> = None;
    // Whether the last answer printed was "no instances".
    let mut was_empty = false;
    loop {
        let query = match index {
            Some(i) => format!("{path}?index={i}&wait=60s"),
            None => path.clone(),
        };
        let answer = client
            .call_within(Method::GET, &query, None, Duration::from_secs(75))
            .await;
        let (now, v) = match answer {
            Ok(v) => (v["index"].as_i64().unwrap_or(0), Some(v)),
            // An older daemon answers 404 for a service without instances.
            Err(e)
                if e.downcast_ref::<crate::client::ApiError>()
                    .is_some_and(|a| a.status == 404) =>
            {
                (0, None)
            }
            Err(e) => return Err(e),
        };
        if index == Some(now) {
            continue; // the wait ended without a change
        }
        let v = v.filter(has_instances);
        // An absent service's index moves when any other service loses its last instance:
        // still none here, nothing to print.
        let still_none = v.is_none() && index.is_some() && was_empty;
        index = Some(now);
        was_empty = v.is_none();
        if still_none {
            continue;
        }
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        match v {
            Some(v) => {
                println!("--- {stamp} {service} (index {now})");
                print_instances(&v);
            }
            None => println!("--- {stamp} {service}: no instances"),
        }
    }
}

/// Whether a `GET /v1/services/{ns}/{svc}` answer lists any instance (a service whose last
/// instance left, or that has none yet, is an empty list).
fn has_instances(v: &serde_json::Value) -> bool {
    v["instances"].as_array().is_some_and(|a| !a.is_empty())
}

/// Prints one address per healthy instance: exactly the set DNS answers and the proxies pick from.
pub async fn resolve(
    service: &str,
    port: Option<&str>,
    output: Output,
    admin: &AdminArgs,
) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(admin)?;
    let v = match client
        .call(
            Method::GET,
            &format!("/v1/services/{}", service_path(service)?),
            None,
        )
        .await
    {
        Ok(v) if has_instances(&v) => v,
        Ok(_) => {
            eprintln!("{service}: no instances");
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for i in v["instances"].as_array().into_iter().flatten() {
        // The served state, as DNS and the proxies use it (an ejected instance is left out).
        if i["served_state"] != "healthy" {
            continue;
        }
        let ip = i["ip"].as_str().unwrap_or("");
        let port = match port {
            None => None,
            Some(name) => match i["ports"][name].as_u64() {
                Some(p) => Some(p),
                None => continue,
            },
        };
        found.push((i["id"].as_str().unwrap_or(""), ip, port));
    }
    match output {
        Output::Json => {
            let list: Vec<serde_json::Value> = found
                .iter()
                .map(|(id, ip, port)| match port {
                    Some(p) => serde_json::json!({ "id": id, "ip": ip, "port": p }),
                    None => serde_json::json!({ "id": id, "ip": ip }),
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        Output::Table => {
            for (_, ip, port) in &found {
                match port {
                    None => println!("{ip}"),
                    Some(p) if ip.contains(':') => println!("[{ip}]:{p}"),
                    Some(p) => println!("{ip}:{p}"),
                }
            }
        }
    }
    if found.is_empty() {
        eprintln!("{service}: no healthy instances");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// `svcd health [--ready]`: the probe endpoints, as an exit code.
pub async fn health(ready: bool, admin: &AdminArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(admin)?;
    let path = if ready { "/readyz" } else { "/healthz" };
    match client.call(Method::GET, path, None).await {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("svcd: {path}: {e}");
            Ok(ExitCode::from(1))
        }
    }
}
