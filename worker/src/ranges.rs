//! Range splitting: which blocks to ask for next. Pure.
//!
//! A subscription at `next` (first unprocessed block) that may go up to `target` (head minus
//! confirmations) asks for at most `max_span` blocks at a time. Successive ranges tile
//! `next..=target` exactly: no block skipped, none asked twice.

use std::ops::RangeInclusive;

/// The next block range to fetch, or `None` when caught up.
pub fn next_range(next: u64, target: u64, max_span: u64) -> Option<RangeInclusive<u64>> {
    debug_assert!(max_span > 0, "max_span must be positive");
    if next > target {
        return None;
    }
    let end = next.saturating_add(max_span.max(1) - 1).min(target);
    Some(next..=end)
}

/// The highest block a subscription with `confirmations` may publish at `head`, or `None`
/// while the chain is shorter than the confirmation depth.
pub fn confirmed_target(head: u64, confirmations: u64) -> Option<u64> {
    head.checked_sub(confirmations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(next_range(10, 9, 100), None);
        assert_eq!(next_range(10, 10, 100), Some(10..=10));
        assert_eq!(next_range(10, 500, 100), Some(10..=109));
        assert_eq!(next_range(u64::MAX - 1, u64::MAX, 100), Some(u64::MAX - 1..=u64::MAX));
        assert_eq!(confirmed_target(10, 3), Some(7));
        assert_eq!(confirmed_target(2, 3), None);
    }

    proptest! {
        #[test]
        fn ranges_tile_the_interval_exactly(start in 0u64..10_000, len in 0u64..5_000, span in 1u64..700) {
            let target = start + len;
            let mut next = start;
            let mut covered = 0u64;
            while let Some(r) = next_range(next, target, span) {
                prop_assert_eq!(*r.start(), next);
                prop_assert!(r.end() - r.start() < span);
                covered += r.end() - r.start() + 1;
                next = r.end() + 1;
            }
            prop_assert_eq!(covered, len + 1);
            prop_assert_eq!(next, target + 1);
        }
    }
}
