//! `cargo fuzz run packet` (from dns/): arbitrary bytes through the UDP fast path and the hickory
//! path. Crashes are bugs; `seeds/` and `corpus/packet` are replayed by `cargo test -p svcd-dns`.
#![no_main]
// `fuzz_target!` expands to the `extern "C"` entry libFuzzer calls, which needs `unsafe`; this
// harness is the one crate in the tree without `forbid(unsafe_code)`.

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use svcd_dns::{DnsMetrics, DnsResponder};
use svcd_registry::store::{Event, EventKind};
use svcd_registry::{EndpointSnapshot, SnapshotBuilder, SnapshotReader};

fn responder() -> &'static Arc<DnsResponder> {
    static R: OnceLock<Arc<DnsResponder>> = OnceLock::new();
    R.get_or_init(|| {
        let mut b = SnapshotBuilder::new();
        for (i, ip) in ["10.0.0.1", "10.0.0.2", "fd00::3"].iter().enumerate() {
            b.apply(&Event {
                kind: EventKind::Put,
                key: format!("/svcd/v1/endpoints/default/web/w{i}"),
                value: format!(r#"{{"ip":"{ip}","ports":{{"http":80}}}}"#).into_bytes(),
                mod_revision: i as i64 + 2,
            });
        }
        let snapshot = b.build(&EndpointSnapshot::default());
        let config = svcd_config::parse("").expect("default config").dns;
        let metrics = DnsMetrics::new(&prometheus::Registry::new()).expect("metrics");
        DnsResponder::new(&config, SnapshotReader::fixed(snapshot), metrics)
    })
}

fuzz_target!(|data: &[u8]| {
    svcd_dns::fuzz_one(responder(), data);
});
