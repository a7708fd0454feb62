//! Backoff for retrying transient failures without storms.
//!
//! Jittered exponential delays, capped. [`retry`] logs a failure once when a dependency
//! goes bad and once when it recovers, not on every attempt.

use std::cell::Cell;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

/// Jittered exponential backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    attempts: u32,
}

impl Backoff {
    /// Starts at `initial`, doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, current: initial, attempts: 0 }
    }

    /// The default for network dependencies: 100 ms doubling to 5 s.
    pub fn network() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The next delay (between 50% and 100% of the nominal one) and advances.
    pub fn next_delay(&mut self) -> Duration {
        self.attempts += 1;
        let nominal = self.current;
        self.current = (self.current * 2).min(self.max);
        let fraction = 0.5 + (jitter() % 1000) as f64 / 2000.0;
        nominal.mul_f64(fraction)
    }

    /// Failures since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
        self.attempts = 0;
    }
}

thread_local! {
    /// This thread's jitter source: seeded from the clock, so that processes (and threads)
    /// spread their retries apart, unless seeded with [`seed_jitter`].
    static JITTER: Cell<u64> = Cell::new(
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64 | 1,
    );
}

/// Makes this thread's backoff jitter a function of `seed` (deterministic simulations).
pub fn seed_jitter(seed: u64) {
    JITTER.with(|state| state.set(seed | 1));
}

/// The next value of this thread's jitter source (xorshift64).
fn jitter() -> u64 {
    JITTER.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

/// Sleeps for the next backoff delay; `false` if cancelled first.
pub async fn pause(backoff: &mut Backoff, cancel: &CancellationToken) -> bool {
    let delay = backoff.next_delay();
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Calls `op` until it succeeds or `cancel` fires (then `None`). Logs the first failure as a
/// warning naming `what`, later ones at debug, and a recovery line once it works again.
pub async fn retry<T, E, F, Fut>(what: &str, cancel: &CancellationToken, mut op: F) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::network();
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return None,
            r = op() => r,
        };
        match result {
            Ok(v) => {
                if backoff.attempts() > 0 {
                    tracing::info!(what, attempts = backoff.attempts(), "recovered");
                }
                return Some(v);
            }
            Err(e) if backoff.attempts() == 0 => {
                tracing::warn!(what, error = %e, "failed, retrying with backoff");
            }
            Err(e) => {
                tracing::debug!(what, error = %e, attempt = backoff.attempts(), "still failing")
            }
        }
        if !pause(&mut backoff, cancel).await {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        for (d, nominal) in delays.iter().zip([100, 200, 400, 400, 400]) {
            assert!(
                *d >= Duration::from_millis(nominal / 2) && *d <= Duration::from_millis(nominal),
                "{d:?}"
            );
        }
        assert_eq!(b.attempts(), 5);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
