//! Header rewriting between client and instance: hop-by-hop headers removed (RFC 9110 §7.6.1),
//! forwarding headers added.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// A verified client certificate's identity, in Envoy's format; removed from what clients send.
pub const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Removes hop-by-hop headers: the fixed set and any named in `Connection`. `keep_upgrade` keeps
/// `Upgrade` and `Connection: upgrade` (a WebSocket handshake is forwarded as such). `TE:
/// trailers` is kept, as gRPC needs it end to end; `Trailer` is end to end (RFC 9110 §6.6.2) and
/// passes.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names (cheap comparisons of standard headers)
    // spares a hashed removal per hop-by-hop name.
    let any = headers.keys().any(|name| {
        *name == header::CONNECTION
            || *name == header::TE
            || *name == header::TRANSFER_ENCODING
            || *name == header::UPGRADE
            || *name == KEEP_ALIVE
            || *name == PROXY_CONNECTION
    });
    if !any && !keep_upgrade {
        return;
    }
    // Names listed in Connection, other than the fixed set (rare; allocates only then).
    let mut listed: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            // `Connection: TE` accompanies `TE: trailers` (RFC 9110 §10.1.4): TE is handled
            // below, its `trailers` kept, so the instance sends the trailers the client asked for.
            if token.is_empty()
                || token.eq_ignore_ascii_case(b"close")
                || token.eq_ignore_ascii_case(b"keep-alive")
                || token.eq_ignore_ascii_case(b"upgrade")
                || token.eq_ignore_ascii_case(b"te")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                listed.push(name);
            }
        }
    }
    for name in listed {
        headers.remove(name);
    }
    headers.remove(header::CONNECTION);
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    if let Some(te) = headers.get(header::TE) {
        let trailers = te
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Trailer fields a gRPC response ends with; HTTP/2 needs no declaration, HTTP/1.1 does.
const GRPC_TRAILERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";

/// For an HTTP/1.1 client that asked for trailers (`TE: trailers`): an HTTP/1.1 response may only
/// carry trailer fields its `Trailer` header declared (hyper sends no others). A gRPC response
/// from an HTTP/2 instance declares none, so its gRPC trailers are declared here.
pub fn declare_trailers(headers: &mut HeaderMap) {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"));
    if grpc && !headers.contains_key(header::TRAILER) {
        headers.insert(header::TRAILER, HeaderValue::from_static(GRPC_TRAILERS));
    }
}

/// Whether a request's `TE` asks for trailers.
pub fn wants_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(header::TE).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    })
}

/// Does this HTTP/1.1 request ask to switch protocols (WebSocket)?
pub fn wants_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        })
}

/// Adds `X-Forwarded-For` (appended to any the client sent), `X-Forwarded-Proto` (`https`
/// when the client came over TLS), `X-Forwarded-Host` (when the client did not set one) and
/// `Via`.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    version: Version,
    client_ip: &HeaderValue,
    host: Option<HeaderValue>,
    https: bool,
) {
    match headers.get(X_FORWARDED_FOR) {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + client_ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(client_ip.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                headers.insert(X_FORWARDED_FOR, v);
            }
        }
        None => {
            headers.insert(X_FORWARDED_FOR, client_ip.clone());
        }
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    if let Some(host) = host {
        if !headers.contains_key(X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST, host);
        }
    }
    let via = match version {
        Version::HTTP_2 => HeaderValue::from_static("2 svcd"),
        Version::HTTP_10 => HeaderValue::from_static("1.0 svcd"),
        _ => HeaderValue::from_static("1.1 svcd"),
    };
    headers.append(header::VIA, via);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_removed_and_forwarding_added() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.9.9.9"));
        strip_hop_by_hop(&mut h, false);
        add_forwarding(
            &mut h,
            Version::HTTP_11,
            &HeaderValue::from_static("127.0.0.1"),
            Some(HeaderValue::from_static("web")),
            false,
        );
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::UPGRADE).is_none());
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h[X_FORWARDED_FOR], "10.9.9.9, 127.0.0.1");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "web");
        assert_eq!(h[header::VIA], "1.1 svcd");
    }

    #[test]
    fn upgrade_kept_for_websocket() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(Version::HTTP_11, &h));
        assert!(!wants_upgrade(Version::HTTP_2, &h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
