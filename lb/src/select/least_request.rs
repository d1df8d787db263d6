//! Least request: power of two choices over a weighted schedule.

use super::WeightedSchedule;

/// Power of two choices, weight-aware: two candidates drawn in proportion to their weights, the
/// one with fewer requests in flight per unit of weight wins; on a tie the first draw does, so
/// with equal load per weight (an idle service, or a steady one) the split follows the weights.
///
/// `n` candidates in `order`; `load(i)`: requests in flight to candidate `i`; `weight(i)`: its
/// weight (at least 1).
pub fn least_request(
    n: usize,
    order: &WeightedSchedule,
    load: impl Fn(usize) -> u64,
    weight: impl Fn(usize) -> u64,
) -> usize {
    let (a, b) = if order.is_weighted() {
        let a = order.at(rand::random_range(0..usize::MAX)).unwrap_or(0);
        let b = order.at(rand::random_range(0..usize::MAX)).unwrap_or(0);
        (
            a,
            if b == a {
                (a + 1 + rand::random_range(0..n - 1)) % n
            } else {
                b
            },
        )
    } else {
        // Two distinct uniform draws with two random numbers.
        let a = rand::random_range(0..n);
        let b = rand::random_range(0..n - 1);
        (a, if b >= a { b + 1 } else { b })
    };
    // load_b / w_b < load_a / w_a, without division.
    if load(b) * weight(a) < load(a) * weight(b) {
        b
    } else {
        a
    }
}
