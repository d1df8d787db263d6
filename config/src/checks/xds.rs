//! Checks of `[xds]`: the listener (TCP or unix socket; TLS on TCP only) and the bounds on
//! streams and names per request.

use super::{tls, Checker};
use crate::model::*;
use crate::raw::*;

pub(super) fn xds(c: &mut Checker, raw: RawXds) -> XdsConfig {
    let listen = raw.listen.and_then(|text| match AdminListen::parse(&text) {
        Ok(l) => Some(l),
        Err(e) => {
            c.err("xds.listen", e);
            None
        }
    });
    let tls = raw.tls.map(|t| tls::server(c, "xds.tls", t));
    if tls.is_some() && matches!(listen, Some(AdminListen::Unix(_))) {
        c.err(
            "xds.tls",
            "TLS needs a TCP listen address (a unix socket is not encrypted)",
        );
    }
    if tls.is_some() && listen.is_none() {
        c.err(
            "xds.tls",
            "set xds.listen (TLS applies to the xDS listener)",
        );
    }
    let max_streams = c.range("xds.max_streams", raw.max_streams, 4096, 1, 1_000_000);
    let max_names = c.range("xds.max_names", raw.max_names, 100_000, 1, 10_000_000);
    XdsConfig {
        listen,
        tls,
        max_streams,
        max_names,
    }
}
