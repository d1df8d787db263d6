//! `cargo fuzz run h1_head` (from proxy/): arbitrary bytes as a request head and as a response
//! head through the HTTP/1.1 fast path's parsers and rewriters. Crashes and hangs are bugs; a
//! fixed-seed run of the same shape is `arbitrary_heads_never_panic` in `cargo test -p
//! svcd-proxy`.
#![no_main]
// `fuzz_target!` expands to the `extern "C"` entry libFuzzer calls, which needs `unsafe`; this
// harness (like dns/fuzz) is outside `forbid(unsafe_code)`.

use libfuzzer_sys::fuzz_target;
use svcd_proxy::http::h1::head::{parse_request, parse_response};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, head)) = data.split_first() else {
        return;
    };
    let mut out = Vec::new();
    let _ = parse_request(head, (flags as usize % 100) + 1, "10.0.0.1", &mut out);
    let _ = parse_response(head, flags & 1 == 1, flags & 2 == 2, &mut out);
});
