//! Response rate limiting for DNS over UDP, per client network (`/24` for IPv4, `/56` for IPv6 by
//! default), as Knot and BIND do: a source that can be spoofed must not turn svcd into an
//! amplifier, and one noisy network must not starve the others.
//!
//! Each network has a GCRA bucket (a token bucket kept as one "theoretical arrival time"): it
//! may take `rate` answers a second with a burst of one second's worth. The buckets live in a
//! fixed table of atomics indexed by a keyed hash of the network, updated with one
//! compare-and-swap: no lock and no allocation per packet. A slot holds a tag of its network; a
//! network finding another's tag takes the slot over with a fresh bucket, so collisions in a
//! table smaller than the number of networks can only let more through, never limit an
//! innocent network harder. Past its rate, every `slip`-th answer is sent truncated (an honest
//! client retries over TCP, which a spoofed source cannot complete) and the rest are dropped.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::Instant;

use svcd_config::RrlConfig;

/// Buckets in the table: 64 Ki networks tracked at once (512 KiB).
const SLOTS: usize = 1 << 16;
/// Low 48 bits of a slot: the arrival time in microseconds since `epoch` (wraps after 8 years).
const TIME_BITS: u32 = 48;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
/// How far ahead of now a bucket's arrival time may run: one second of answers at the rate.
const BURST_US: u64 = 1_000_000;

/// What to do with one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Answer,
    /// Over the rate: send a truncated answer (TC set, no records).
    Truncate,
    /// Over the rate: send nothing.
    Drop,
}

pub struct RateLimiter {
    slots: Box<[AtomicU64]>,
    /// Answers per second per network; 0 is off. Atomics, so a reload changes them in place.
    rate: AtomicU32,
    slip: AtomicU32,
    ipv4_prefix: AtomicU8,
    ipv6_prefix: AtomicU8,
    /// Limited answers so far, to pick every `slip`-th one.
    limited: AtomicU32,
    /// Random per process: which slot a network lands in cannot be aimed at from outside.
    seed: u64,
    epoch: Instant,
}

impl RateLimiter {
    pub fn new(config: &RrlConfig) -> Self {
        let limiter = RateLimiter {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            rate: AtomicU32::new(0),
            slip: AtomicU32::new(0),
            ipv4_prefix: AtomicU8::new(24),
            ipv6_prefix: AtomicU8::new(56),
            limited: AtomicU32::new(0),
            seed: rand::random(),
            epoch: Instant::now(),
        };
        limiter.reconfigure(config);
        limiter
    }

    pub fn reconfigure(&self, config: &RrlConfig) {
        self.rate.store(config.rate, Ordering::Relaxed);
        self.slip.store(config.slip, Ordering::Relaxed);
        self.ipv4_prefix
            .store(config.ipv4_prefix, Ordering::Relaxed);
        self.ipv6_prefix
            .store(config.ipv6_prefix, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.rate.load(Ordering::Relaxed) > 0
    }

    /// Microseconds since the limiter started: read once per batch of packets, not per packet.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Whether an answer to `client` may go out at `now` (from [`Self::now`]).
    pub fn check(&self, client: IpAddr, now: u64) -> Verdict {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return Verdict::Answer;
        }
        let hash = self.hash(client);
        let slot = &self.slots[(hash as usize) & (SLOTS - 1)];
        let tag = hash >> TIME_BITS;
        let interval = (1_000_000 / u64::from(rate)).max(1);
        let now = now & TIME_MASK;
        let mut current = slot.load(Ordering::Relaxed);
        loop {
            let arrival = if current >> TIME_BITS == tag {
                (current & TIME_MASK).max(now)
            } else {
                now // an empty slot, or another network's: a fresh bucket
            };
            if arrival - now > BURST_US {
                return self.limited();
            }
            let next = (tag << TIME_BITS) | ((arrival + interval) & TIME_MASK);
            match slot.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Verdict::Answer,
                Err(seen) => current = seen,
            }
        }
    }

    fn limited(&self) -> Verdict {
        match self.slip.load(Ordering::Relaxed) {
            0 => Verdict::Drop,
            slip => {
                if self.limited.fetch_add(1, Ordering::Relaxed) % slip == 0 {
                    Verdict::Truncate
                } else {
                    Verdict::Drop
                }
            }
        }
    }

    /// The client's network, mixed with the seed (a 64-bit multiply-xorshift: enough spread for
    /// a table index and a tag, and cheap per packet).
    fn hash(&self, client: IpAddr) -> u64 {
        let network: u128 = match client {
            IpAddr::V4(v4) => {
                let bits = self.ipv4_prefix.load(Ordering::Relaxed).min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
                u128::from(u32::from(v4) & mask) | (4 << 64)
            }
            IpAddr::V6(v6) => {
                let bits = self.ipv6_prefix.load(Ordering::Relaxed).min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
                (u128::from(v6) & mask) ^ (6 << 120)
            }
        };
        let mut x = (network as u64) ^ ((network >> 64) as u64).rotate_left(29) ^ self.seed;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
}

/// A truncated answer to `query`: its header with QR and TC set and every count zero but the
/// question's, and its question. `None` when the question cannot be found (then: drop).
pub fn truncated_answer(query: &[u8], out: &mut Vec<u8>) -> Option<()> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: a name of labels (no compression in a question we answer), type, class.
    let mut at = 12;
    loop {
        let len = *query.get(at)? as usize;
        if len == 0 {
            at += 1;
            break;
        }
        if len > 63 {
            return None;
        }
        at += 1 + len;
    }
    let end = at + 4;
    if end > query.len() {
        return None;
    }
    out.clear();
    out.extend_from_slice(&query[..12]);
    out[2] = 0x80 | (query[2] & 0x79) | 0x02; // QR, opcode, RD kept; TC set; AA clear
    out[3] = 0; // NOERROR
    out[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&query[12..end]);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: u32, slip: u32) -> RateLimiter {
        RateLimiter::new(&RrlConfig {
            rate,
            slip,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
        })
    }

    fn count(l: &RateLimiter, ip: &str, n: usize, now: u64) -> [usize; 3] {
        let mut seen = [0; 3];
        for _ in 0..n {
            match l.check(ip.parse().unwrap(), now) {
                Verdict::Answer => seen[0] += 1,
                Verdict::Truncate => seen[1] += 1,
                Verdict::Drop => seen[2] += 1,
            }
        }
        seen
    }

    #[test]
    fn a_network_gets_its_rate_with_a_second_of_burst_and_others_are_untouched() {
        let l = limiter(100, 2);
        let now = 5_000_000;
        // A burst of 1,000 from one /24 (two addresses in it): about one second's worth passes.
        let a = count(&l, "10.1.2.3", 500, now);
        let b = count(&l, "10.1.2.200", 500, now);
        let answered = a[0] + b[0];
        assert!((100..=102).contains(&answered), "{a:?} {b:?}");
        // Every second limited answer is truncated, the rest dropped.
        let limited = a[1] + a[2] + b[1] + b[2];
        assert_eq!(a[1] + b[1], limited.div_ceil(2), "{a:?} {b:?}");
        // Another /24 and an IPv6 client are not affected.
        assert_eq!(count(&l, "10.1.3.1", 50, now)[0], 50);
        assert_eq!(count(&l, "2001:db8::1", 50, now)[0], 50);
        // Half a second later, half a second of tokens came back.
        let later = count(&l, "10.1.2.3", 100, now + 500_000);
        assert!((49..=51).contains(&later[0]), "{later:?}");
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_56() {
        let l = limiter(10, 0);
        let first = count(&l, "2001:db8:0:aa00::1", 30, 0);
        let same_56 = count(&l, "2001:db8:0:aaff::2", 30, 0);
        let other_56 = count(&l, "2001:db8:0:ab00::1", 30, 0);
        assert_eq!(first[0] + same_56[0], 11, "{first:?} {same_56:?}");
        assert_eq!(first[1] + same_56[1], 0, "slip 0 drops all");
        assert_eq!(other_56[0], 11);
    }

    #[test]
    fn off_answers_everything() {
        let l = limiter(0, 2);
        assert_eq!(count(&l, "10.0.0.1", 10_000, 0)[0], 10_000);
    }

    #[test]
    fn truncated_answers_keep_id_and_question() {
        let query = crate::tests::query(
            "web.default.svc.cluster.local.",
            hickory_proto::rr::RecordType::A,
            None,
        );
        let mut out = Vec::new();
        truncated_answer(&query, &mut out).unwrap();
        let m = hickory_proto::op::Message::from_vec(&out).unwrap();
        assert!(m.metadata.truncation);
        assert_eq!(m.metadata.id, u16::from_be_bytes([query[0], query[1]]));
        assert_eq!(m.queries.len(), 1);
        assert!(m.answers.is_empty());
        assert!(truncated_answer(&query[..20], &mut out).is_none());
    }
}
