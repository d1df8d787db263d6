//! The one retry pause of the registry (the sync loop's reconnects, the etcd store's retries):
//! exponential, with "equal jitter" — each pause is drawn uniformly from the upper half of the
//! current step, `[step/2, step]`, then the step doubles up to `max`. Half a step is always
//! kept, so a retry never comes at once; the other half spreads the nodes of a fleet that lost
//! the store together, so they do not return in step.

use std::time::Duration;

pub struct Backoff {
    /// The step of the next pause.
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// The next pause: within `[step/2, step]`; then the step doubles (up to `max`).
    pub fn step(&mut self) -> Duration {
        let current = self.next;
        self.next = (self.next * 2).min(self.max);
        current.mul_f64(rand::random_range(0.5..=1.0))
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_stay_in_the_upper_half_of_a_doubling_step() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(800));
        let mut b = Backoff::new(min, max);
        for step in [100u64, 200, 400, 800, 800] {
            let pause = b.step();
            let step = Duration::from_millis(step);
            assert!(pause >= step / 2 && pause <= step, "{pause:?} for {step:?}");
        }
        b.reset();
        assert!(b.step() <= min);
    }
}
