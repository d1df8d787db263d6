//! DNS-label rules shared by namespaces, services, instance ids and port names, so a name accepted
//! by the API is always a name DNS can answer for.

/// The namespace used when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Checks an RFC 1123 label: 1–63 characters of `a-z`, `0-9`, `-`, not starting or ending with `-`.
/// Upper case is rejected rather than folded so the stored key is the one the user typed.
pub fn check_label(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 63 {
        return Err(format!("{name:?} is longer than 63 characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{name:?} contains {c:?}; use lower-case letters, digits and '-' (RFC 1123 label)"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("{name:?} must not start or end with '-'"));
    }
    Ok(())
}

/// Checks a named port (`http`, `grpc-web`): an RFC 1123 label of at most 15 characters (the
/// RFC 6335 service-name limit) so `_<port>._tcp.<svc>` SRV names stay valid.
pub fn check_port_name(name: &str) -> Result<(), String> {
    check_label(name)?;
    if name.len() > 15 {
        return Err(format!("{name:?} is longer than 15 characters (RFC 6335)"));
    }
    Ok(())
}

/// Splits `svc` or `svc.ns` into `(service, namespace)`, checking both labels.
pub fn parse_service_ref(text: &str) -> Result<(String, String), String> {
    let (svc, ns) = match text.split_once('.') {
        Some((svc, ns)) => (svc, ns),
        None => (text, DEFAULT_NAMESPACE),
    };
    check_label(svc).map_err(|e| format!("service {e}"))?;
    check_label(ns).map_err(|e| format!("namespace {e}"))?;
    Ok((svc.to_string(), ns.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(check_label("web-1").is_ok());
        assert!(check_label("a").is_ok());
        assert!(check_label("").is_err());
        assert!(check_label("-a").is_err());
        assert!(check_label("a-").is_err());
        assert!(check_label("Web").is_err());
        assert!(check_label("a_b").is_err());
        assert!(check_label(&"a".repeat(64)).is_err());
        assert!(check_label(&"a".repeat(63)).is_ok());
        assert!(check_port_name("http").is_ok());
        assert!(check_port_name("abcdefghijklmnop").is_err());
    }

    #[test]
    fn service_refs() {
        assert_eq!(
            parse_service_ref("db").unwrap(),
            ("db".into(), "default".into())
        );
        assert_eq!(
            parse_service_ref("db.prod").unwrap(),
            ("db".into(), "prod".into())
        );
        assert!(parse_service_ref("db.prod.x").is_err());
        assert!(parse_service_ref("DB").is_err());
    }
}
