//! Weighted selection without locks: a smooth weighted round-robin *schedule*, computed once per
//! set of weights, that a shared `AtomicUsize` counter indexes.
//!
//! nginx's smooth weighted round robin mutates every peer's current weight on each pick, under a
//! lock. The sequence it produces depends only on the weights, so it can be computed up front:
//! weights 1:3 give `B A B B`, weights 5:1:1 give `A A B A C A A`. A pick is then
//! `schedule[counter % len]` — one atomic add, no lock, no allocation — and the spread is exactly
//! the weights' ratio over every full cycle, interleaved (no bursts to the heavy instance).
//!
//! Equal weights need no schedule at all (plain `counter % n`). Weights are reduced by their
//! greatest common divisor; a cycle longer than [`MAX_CYCLE`] is scaled down proportionally (every
//! weight keeps at least 1), which bounds the memory at 4 bytes × `MAX_CYCLE` per set.

/// Longest schedule kept; larger weight sums are scaled to fit (ratios within 1/MAX_CYCLE).
pub const MAX_CYCLE: u64 = 4096;

/// The order in which instances are picked, by index into the weighted set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightedSchedule {
    /// Empty when all weights are equal (uniform round robin over `len`).
    order: Box<[u32]>,
    len: usize,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl WeightedSchedule {
    /// The schedule for `weights` (a weight of 0 counts as 1: every listed instance gets picks).
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let mut w: Vec<u64> = weights.into_iter().map(|w| u64::from(w.max(1))).collect();
        let len = w.len();
        if len <= 1 || w.iter().all(|&x| x == w[0]) {
            return WeightedSchedule {
                order: Box::new([]),
                len,
            };
        }
        let g = w.iter().copied().fold(0, gcd);
        w.iter_mut().for_each(|x| *x /= g);
        let mut total: u64 = w.iter().sum();
        if total > MAX_CYCLE {
            w.iter_mut()
                .for_each(|x| *x = (*x * MAX_CYCLE / total).max(1));
            total = w.iter().sum();
        }
        // nginx's smooth weighted round robin, run for one whole cycle.
        let mut current = vec![0i64; len];
        let mut order = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for i in 0..len {
                current[i] += w[i] as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total as i64;
            order.push(best as u32);
        }
        WeightedSchedule {
            order: order.into_boxed_slice(),
            len,
        }
    }

    /// How many instances the schedule is over.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the weights differ (a plain rotation would not honour them).
    #[inline]
    pub fn is_weighted(&self) -> bool {
        !self.order.is_empty()
    }

    /// The index picked at position `n` of the sequence. `None` only for an empty set.
    #[inline]
    pub fn at(&self, n: usize) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        Some(if self.order.is_empty() {
            n % self.len
        } else {
            self.order[n % self.order.len()] as usize
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(s: &WeightedSchedule, picks: usize) -> Vec<usize> {
        let mut c = vec![0; s.len()];
        for n in 0..picks {
            c[s.at(n).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn smooth_and_proportional() {
        let s = WeightedSchedule::new([1, 3]);
        let seq: Vec<usize> = (0..4).map(|n| s.at(n).unwrap()).collect();
        assert_eq!(seq, [1, 0, 1, 1], "nginx's smooth order");
        assert_eq!(counts(&s, 10_000), [2500, 7500]);
        let s = WeightedSchedule::new([5, 1, 1]);
        let seq: Vec<usize> = (0..7).map(|n| s.at(n).unwrap()).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn equal_weights_and_edges() {
        let s = WeightedSchedule::new([7, 7, 7]);
        assert!(!s.is_weighted());
        assert_eq!(counts(&s, 9), [3, 3, 3]);
        assert_eq!(WeightedSchedule::new([]).at(3), None);
        assert_eq!(WeightedSchedule::new([9]).at(3), Some(0));
        // Reduced by the gcd: 200:600 is 1:3, a 4-long cycle.
        let s = WeightedSchedule::new([200, 600]);
        assert_eq!(s.order.len(), 4);
    }

    #[test]
    fn huge_weights_scaled_within_the_cap() {
        let s = WeightedSchedule::new([65535, 1, 30000]);
        assert!(s.order.len() as u64 <= MAX_CYCLE + 3);
        let c = counts(&s, s.order.len());
        assert!(c[1] >= 1, "every instance keeps a share");
        let ratio = c[0] as f64 / c[2] as f64;
        assert!((ratio - 65535.0 / 30000.0).abs() < 0.01, "{ratio}");
    }
}
