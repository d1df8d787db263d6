//! The registration value: what one running process tells the cluster about itself. The same type
//! is read from etcd, accepted by the admin API and written as a static entry in the config file.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::names;

/// Application protocol spoken on the instance's ports; the L7 proxy picks HTTP/1.1 or HTTP/2
/// upstream from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
    H2,
    Grpc,
}

/// Serving state. Only `Healthy` instances are handed out by DNS and the proxies; `Draining` keeps
/// open connections but receives nothing new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Healthy,
    Unhealthy,
    Draining,
    /// Registered healthy with a `check` that has not passed yet: not served until it does (as
    /// Envoy's hosts awaiting their first active check). Written by the daemon holding the
    /// registration, never accepted from a registering client.
    Pending,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Unhealthy => "unhealthy",
            State::Draining => "draining",
            State::Pending => "pending",
        }
    }
}

/// One instance of a service. Unknown fields are rejected so a typo in an API call or config file
/// (`"prots"`) is an error instead of an instance silently registered without ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub ip: IpAddr,
    /// Named ports (`http = 8080`); names become SRV `_<name>._tcp` labels.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    /// Node (machine) the instance runs on; informational and used for locality later.
    #[serde(default)]
    pub node: String,
    /// Relative share of traffic and SRV weight, 1..=65535.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub state: State,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Active health check run by the daemon holding the registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
    /// Why the instance is in its state, when svcd knows: written by the daemon that runs the
    /// instance's check when the check marks it unhealthy (the last check error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// Passes when a TCP connection opens within the timeout.
    Tcp,
    /// Passes on a 2xx/3xx answer to `GET path` within the timeout.
    Http,
    /// gRPC health protocol (grpc.health.v1).
    Grpc,
}

/// `check = { type = "http", port = "http", path = "/healthz", interval = "2s", timeout = "1s",
/// healthy_threshold = 2, unhealthy_threshold = 3 }`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Named port to check; default: the instance's only (or first) port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    #[serde(default = "default_check_path")]
    pub path: String,
    #[serde(default = "default_interval")]
    pub interval: String,
    #[serde(default = "default_timeout")]
    pub timeout: String,
    #[serde(default = "default_healthy")]
    pub healthy_threshold: u32,
    #[serde(default = "default_unhealthy")]
    pub unhealthy_threshold: u32,
}

/// Largest registration value accepted, from the API or found in the store (as the API's body
/// limit).
pub const MAX_INSTANCE_JSON: usize = 64 * 1024;

fn default_check_path() -> String {
    "/healthz".into()
}
fn default_interval() -> String {
    "2s".into()
}
fn default_timeout() -> String {
    "1s".into()
}
fn default_healthy() -> u32 {
    2
}
fn default_unhealthy() -> u32 {
    3
}

impl CheckSpec {
    /// A TCP check of `port` with the default timings (`svcd exec`'s default).
    pub fn tcp(port: Option<String>) -> Self {
        CheckSpec {
            kind: CheckKind::Tcp,
            port,
            path: default_check_path(),
            interval: default_interval(),
            timeout: default_timeout(),
            healthy_threshold: default_healthy(),
            unhealthy_threshold: default_unhealthy(),
        }
    }

    pub fn interval(&self) -> std::time::Duration {
        humantime::parse_duration(&self.interval).unwrap_or(std::time::Duration::from_secs(2))
    }

    pub fn timeout(&self) -> std::time::Duration {
        humantime::parse_duration(&self.timeout).unwrap_or(std::time::Duration::from_secs(1))
    }

    fn validate(&self, ports: &BTreeMap<String, u16>, errors: &mut Vec<FieldError>) {
        for (field, value) in [("interval", &self.interval), ("timeout", &self.timeout)] {
            match humantime::parse_duration(value) {
                Ok(d) if !d.is_zero() => {}
                _ => errors.push(FieldError::new(
                    format!("check.{field}"),
                    format!("invalid duration {value:?}"),
                )),
            }
        }
        if self.healthy_threshold == 0 || self.unhealthy_threshold == 0 {
            errors.push(FieldError::new("check", "thresholds must be at least 1"));
        }
        match &self.port {
            Some(name) if !ports.contains_key(name) => errors.push(FieldError::new(
                "check.port",
                format!("{name:?} is not one of the instance's ports"),
            )),
            None if ports.is_empty() => errors.push(FieldError::new(
                "check.port",
                "the instance has no port to check",
            )),
            _ => {}
        }
        if !self.path.starts_with('/') {
            errors.push(FieldError::new("check.path", "must start with '/'"));
        }
    }

    /// The port number to check on an instance.
    pub fn target_port(&self, ports: &BTreeMap<String, u16>) -> Option<u16> {
        match &self.port {
            Some(name) => ports.get(name).copied(),
            None => ports.values().next().copied(),
        }
    }
}

fn default_weight() -> u32 {
    1
}

impl Instance {
    pub fn new(ip: IpAddr) -> Self {
        Self {
            ip,
            ports: BTreeMap::new(),
            node: String::new(),
            weight: 1,
            tags: Vec::new(),
            protocol: Protocol::default(),
            state: State::default(),
            meta: BTreeMap::new(),
            check: None,
            reason: None,
        }
    }

    /// Every semantic problem, with paths relative to the instance (`ports.HTTP`, `weight`).
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (name, port) in &self.ports {
            if let Err(e) = names::check_port_name(name) {
                errors.push(FieldError::new(
                    format!("ports.{name}"),
                    format!("port name {e}"),
                ));
            }
            if *port == 0 {
                errors.push(FieldError::new(
                    format!("ports.{name}"),
                    "port must be 1..=65535",
                ));
            }
        }
        if self.weight == 0 || self.weight > 65535 {
            errors.push(FieldError::new(
                "weight",
                format!("{} is out of range 1..=65535", self.weight),
            ));
        }
        if self.ip.is_unspecified() || self.ip.is_multicast() {
            errors.push(FieldError::new(
                "ip",
                format!("{} is not a unicast address", self.ip),
            ));
        }
        if self.node.len() > 253 {
            errors.push(FieldError::new("node", "longer than 253 characters"));
        }
        if let Some(check) = &self.check {
            check.validate(&self.ports, &mut errors);
        }
        for (i, tag) in self.tags.iter().enumerate() {
            if tag.is_empty() || tag.len() > 255 {
                errors.push(FieldError::new(
                    format!("tags[{i}]"),
                    "must be 1..=255 bytes",
                ));
            }
        }
        errors
    }

    /// [`Self::validate`] for a new registration (the API, static config entries): also refuses
    /// `state = "pending"`, which only the daemon running the instance's check writes.
    pub fn validate_registration(&self) -> Vec<FieldError> {
        let mut errors = self.validate();
        if self.state == State::Pending {
            errors.push(FieldError::new(
                "state",
                "\"pending\" is set by the daemon holding the registration until its check \
                 first passes; register \"healthy\" (the default) with a check",
            ));
        }
        errors
    }

    /// Parses the JSON stored in etcd or sent to the API, then validates it. The error names the
    /// offending field. A registration is one JSON object of at most [`MAX_INSTANCE_JSON`] bytes
    /// (serde would also take a struct from a JSON array; that is not a registration).
    pub fn from_json(bytes: &[u8]) -> Result<Instance, FieldError> {
        if bytes.len() > MAX_INSTANCE_JSON {
            return Err(FieldError::new(
                "",
                format!(
                    "a value of {} bytes is over the {} KiB limit",
                    bytes.len(),
                    MAX_INSTANCE_JSON / 1024
                ),
            ));
        }
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(FieldError::new("", "a registration is a JSON object"));
        }
        // The plain parse first (a million of these at start-up; tracking the path costs a
        // fifth more), the path-tracking one only to name the field of a value that fails.
        let instance = match serde_json::from_slice::<Instance>(bytes) {
            Ok(instance) => instance,
            Err(_) => Self::parse_with_path(bytes)?,
        };
        if let Some(first) = instance.validate().into_iter().next() {
            return Err(first);
        }
        Ok(instance)
    }

    /// The error of a value that does not parse, with the path of the offending field.
    fn parse_with_path(bytes: &[u8]) -> Result<Instance, FieldError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let instance: Instance = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let mut message = e.into_inner().to_string();
            // serde_json appends " at line L column C"; useless for one-line values.
            if let Some(pos) = message.find(" at line ") {
                message.truncate(pos);
            }
            FieldError::new(path, crate::suggest::unknown_field(message))
        })?;
        de.end()
            .map_err(|e| FieldError::new("", format!("trailing data: {e}")))?;
        Ok(instance)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("Instance serializes infallibly")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_roundtrip_and_defaults() {
        let i = Instance::from_json(br#"{"ip":"10.0.0.5","ports":{"http":8080}}"#).unwrap();
        assert_eq!(i.weight, 1);
        assert_eq!(i.state, State::Healthy);
        assert_eq!(i.protocol, Protocol::Tcp);
        assert_eq!(Instance::from_json(&i.to_json()).unwrap(), i);
    }

    #[test]
    fn checks_parse_with_defaults_and_report_fields() {
        let i = Instance::from_json(
            br#"{"ip":"10.0.0.1","ports":{"http":80},"check":{"type":"http"}}"#,
        )
        .unwrap();
        let c = i.check.unwrap();
        assert_eq!(
            (c.path.as_str(), c.healthy_threshold, c.unhealthy_threshold),
            ("/healthz", 2, 3)
        );
        assert_eq!(c.interval(), std::time::Duration::from_secs(2));
        assert_eq!(c.target_port(&i.ports), Some(80));
        for (json, field) in [
            (
                r#"{"ip":"10.0.0.1","ports":{"http":80},"check":{"type":"http","interval":"soon"}}"#,
                "check.interval",
            ),
            (r#"{"ip":"10.0.0.1","check":{"type":"tcp"}}"#, "check.port"),
            (
                r#"{"ip":"10.0.0.1","ports":{"http":80},"check":{"type":"http","path":"x"}}"#,
                "check.path",
            ),
            (
                r#"{"ip":"10.0.0.1","ports":{"http":80},"check":{"type":"ping"}}"#,
                "check.type",
            ),
        ] {
            assert_eq!(
                Instance::from_json(json.as_bytes()).unwrap_err().path,
                field,
                "{json}"
            );
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = Instance::from_json(br#"{"ip":"nope"}"#).unwrap_err();
        assert_eq!(e.path, "ip");
        let e = Instance::from_json(br#"{"ip":"10.0.0.1","prots":{}}"#).unwrap_err();
        assert!(e.message.contains("unknown field `prots`"), "{e}");
        assert!(e.message.ends_with("; did you mean `ports`?"), "{e}");
        let e = Instance::from_json(br#"{"ip":"10.0.0.1","ports":{"http":70000}}"#).unwrap_err();
        assert_eq!(e.path, "ports.http");
        let e = Instance::from_json(br#"{"ip":"10.0.0.1","ports":{"HTTP":80}}"#).unwrap_err();
        assert_eq!(e.path, "ports.HTTP");
        let e = Instance::from_json(br#"{"ip":"10.0.0.1","weight":0}"#).unwrap_err();
        assert_eq!(e.path, "weight");
        let e = Instance::from_json(br#"{"ip":"10.0.0.1","state":"dead"}"#).unwrap_err();
        assert_eq!(e.path, "state");
        assert!(Instance::from_json(b"garbage").is_err());
        assert!(Instance::from_json(br#"{"ip":"0.0.0.0"}"#).is_err());
    }
}
