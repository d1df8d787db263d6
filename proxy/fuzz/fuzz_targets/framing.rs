//! `cargo fuzz run framing` (from proxy/): arbitrary client bytes through the HTTP framing guard
//! (its httparse head parse, chunk sizes and trailers), cut into reads where the input says, with
//! the upgrade flag flipping. Crashes and hangs are bugs; a fixed-seed run of the same shape is
//! `arbitrary_bytes_never_panic` in `cargo test -p svcd-proxy`.
#![no_main]
// `fuzz_target!` expands to the `extern "C"` entry libFuzzer calls, which needs `unsafe`; this
// harness (like dns/fuzz) is outside `forbid(unsafe_code)`.

use libfuzzer_sys::fuzz_target;
use svcd_proxy::http::framing::FramingGuard;

fuzz_target!(|data: &[u8]| {
    // First byte: where to cut reads; second: when the handler "upgrades".
    let (cut, rest) = match data {
        [c, u, rest @ ..] => ((*c as usize % 64) + 1, (*u, rest)),
        _ => return,
    };
    let (upgrade_at, stream) = rest;
    let mut guard = FramingGuard::new(8192, 32);
    for (i, read) in stream.chunks(cut).enumerate() {
        guard.feed(read, i >= upgrade_at as usize);
    }
});
