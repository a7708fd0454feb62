//! Provider limits on `eth_getLogs`, and the range size that adapts to them. Pure.
//!
//! Every provider caps `eth_getLogs` (by block span, by result count, by response size or by
//! time) and says so in its own words, sometimes with the range that would work. [`range_hint`]
//! reads those answers; [`RangeSizer`] turns them, and the size of successful answers, into the
//! next span: shrink to what the provider suggests (or halve), grow back while answers are
//! small, never above the configured maximum.
//!
//! Message formats, as the providers and clients document and emit them:
//! - Alchemy: `Log response size exceeded. ... this block range should work: [0x1, 0x2]`
//! - Infura / geth: `query returned more than 10000 results` (Infura adds `data: {from, to}`)
//! - QuickNode: `eth_getLogs is limited to a 10,000 range` / `... limited to a 10000 blocks range`
//! - Ankr: `block range is too wide`; Cloudflare: `Max range: 3500`
//! - reth / erigon: `query exceeds max results 20000, retry with the range 100-200`,
//!   `query exceeds max block range 100000`
//! - others: `exceed maximum block range: 5000`, `Maximum allowed number of requested blocks is
//!   5000`, `range too large`, `response size exceeded`, `log query timed out`.

/// What an `eth_getLogs` error says about the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeHint {
    /// The provider named a range that works (starting at the requested `from`).
    Suggested {
        /// First block.
        from: u64,
        /// Last block.
        to: u64,
    },
    /// The provider named its largest span.
    MaxSpan(u64),
    /// Too large, without a figure: halve.
    TooLarge,
}

/// Reads a JSON-RPC error of `eth_getLogs` (`message` and the `data` member as JSON text, if
/// any); `None` when it is not about the range or result size.
pub fn range_hint(message: &str, data: Option<&str>) -> Option<RangeHint> {
    let lower = message.to_ascii_lowercase();
    if let Some((from, to)) = bracketed_hex_pair(message).or_else(|| retry_with_range(&lower)) {
        return Some(RangeHint::Suggested { from, to });
    }
    if let Some((from, to)) = data.and_then(data_from_to) {
        return Some(RangeHint::Suggested { from, to });
    }
    let about_range = ["range", "blocks"].iter().any(|w| lower.contains(w));
    let about_size = [
        "more than",
        "max results",
        "too many",
        "response size",
        "size exceeded",
        "exceeds limit",
        "timed out",
        "timeout",
        "too wide",
        "too large",
        "too big",
        "limit",
        "exceed",
        "max",
    ]
    .iter()
    .any(|w| lower.contains(w));
    if !about_size {
        return None;
    }
    if about_range
        && !lower.contains("results")
        && let Some(span) = largest_number(&lower)
        && span > 0
    {
        return Some(RangeHint::MaxSpan(span));
    }
    Some(RangeHint::TooLarge)
}

/// `[0x4c6e3a, 0x4c7249]`.
fn bracketed_hex_pair(message: &str) -> Option<(u64, u64)> {
    let start = message.find("[0x")?;
    let end = start + message[start..].find(']')?;
    let (a, b) = message[start + 1..end].split_once(',')?;
    Some((hex(a.trim())?, hex(b.trim())?))
}

/// `retry with the range 100-200`.
fn retry_with_range(lower: &str) -> Option<(u64, u64)> {
    let rest = &lower[lower.find("retry with the range")? + "retry with the range".len()..];
    let (a, b) = rest.trim().split_once('-')?;
    let b: String = b.chars().take_while(char::is_ascii_digit).collect();
    Some((a.trim().parse().ok()?, b.parse().ok()?))
}

/// Infura's `{"from": "0x..", "to": "0x..", "limit": 10000}`.
fn data_from_to(data: &str) -> Option<(u64, u64)> {
    let value: serde_json::Value = serde_json::from_str(data).ok()?;
    Some((hex(value.get("from")?.as_str()?)?, hex(value.get("to")?.as_str()?)?))
}

fn hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.trim_matches('"').strip_prefix("0x")?, 16).ok()
}

/// The largest decimal number in the text, reading `10,000` as 10000.
fn largest_number(text: &str) -> Option<u64> {
    let cleaned: String = text
        .char_indices()
        .filter(|&(i, c)| {
            let digit_around = |j: Option<usize>| {
                j.and_then(|j| text[j..].chars().next()).is_some_and(|c| c.is_ascii_digit())
            };
            !(c == ',' && digit_around(i.checked_sub(1)) && digit_around(Some(i + 1)))
        })
        .map(|(_, c)| c)
        .collect();
    cleaned
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty() && s.len() < 19)
        .filter_map(|s| s.parse().ok())
        .max()
}

/// The adaptive span of `eth_getLogs` ranges for one subscription.
#[derive(Debug, Clone)]
pub struct RangeSizer {
    max: u64,
    span: u64,
}

/// Answers with fewer logs than this let the span grow.
pub const SMALL_ANSWER: usize = 1_000;
/// Answers with more logs than this make the span shrink, to what would have held
/// [`TARGET_ANSWER`] logs: memory per range stays bounded whatever the contract's density.
pub const LARGE_ANSWER: usize = 10_000;
/// What a shrunk span aims at.
pub const TARGET_ANSWER: usize = 5_000;
/// The first span, doubled while answers are small. Small, because the first answer is the
/// only one asked blind: ten blocks of the busiest contracts are still a modest answer.
pub const INITIAL_SPAN: u64 = 10;

impl RangeSizer {
    /// Starts small ([`INITIAL_SPAN`], or the maximum if lower).
    pub fn new(max: u64) -> Self {
        let max = max.max(1);
        Self { max, span: INITIAL_SPAN.min(max) }
    }

    /// The span to ask for next.
    pub fn span(&self) -> u64 {
        self.span
    }

    /// A range of `requested` blocks was answered with `logs` logs.
    pub fn answered(&mut self, requested: u64, logs: usize) {
        if logs < SMALL_ANSWER && requested >= self.span {
            self.span = self.span.saturating_mul(2).min(self.max);
        } else if logs > LARGE_ANSWER {
            let fitting = u128::from(requested) * TARGET_ANSWER as u128 / logs as u128;
            self.span = u64::try_from(fitting).unwrap_or(u64::MAX).clamp(1, self.max);
        }
    }

    /// A range of `requested` blocks was refused (or timed out) with `hint`. Returns the new
    /// span: what the provider named, else half, and always smaller than `requested` (down to 1).
    pub fn refused(&mut self, requested: u64, hint: RangeHint) -> u64 {
        let proposed = match hint {
            RangeHint::Suggested { from, to } if to >= from => to - from + 1,
            RangeHint::MaxSpan(span) => span,
            _ => requested / 2,
        };
        self.span = proposed.clamp(1, requested.saturating_sub(1).max(1)).min(self.max);
        self.span
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn provider_messages() {
        let cases: &[(&str, Option<&str>, Option<RangeHint>)] = &[
            (
                "Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range and no limit on the response size, or you can request any block range with a cap of 10K logs in the response. Based on your parameters, this block range should work: [0x4c6e3a, 0x4c7249]",
                None,
                Some(RangeHint::Suggested { from: 0x4c6e3a, to: 0x4c7249 }),
            ),
            (
                "query returned more than 10000 results",
                Some(r#"{"from":"0x10","limit":10000,"to":"0x20"}"#),
                Some(RangeHint::Suggested { from: 16, to: 32 }),
            ),
            ("query returned more than 10000 results", None, Some(RangeHint::TooLarge)),
            ("eth_getLogs is limited to a 10,000 range", None, Some(RangeHint::MaxSpan(10_000))),
            (
                "eth_getLogs and eth_newFilter are limited to a 10000 blocks range",
                None,
                Some(RangeHint::MaxSpan(10_000)),
            ),
            ("block range is too wide", None, Some(RangeHint::TooLarge)),
            ("Max range: 3500", None, Some(RangeHint::MaxSpan(3500))),
            (
                "query exceeds max results 20000, retry with the range 24383075-24383096",
                None,
                Some(RangeHint::Suggested { from: 24383075, to: 24383096 }),
            ),
            ("query exceeds max block range 100000", None, Some(RangeHint::MaxSpan(100_000))),
            ("exceed maximum block range: 5000", None, Some(RangeHint::MaxSpan(5000))),
            ("Maximum allowed number of requested blocks is 5000", None, Some(RangeHint::MaxSpan(5000))),
            ("log query timed out", None, Some(RangeHint::TooLarge)),
            ("logs matched by query exceeds limit of 10000", None, Some(RangeHint::TooLarge)),
            ("execution reverted", None, None),
            ("invalid argument 0: hex string without 0x prefix", None, None),
        ];
        for (message, data, want) in cases {
            assert_eq!(range_hint(message, *data), *want, "{message}");
        }
    }

    #[test]
    fn refusals_shrink_and_small_answers_grow_back() {
        let mut s = RangeSizer::new(1000);
        assert_eq!(s.span(), INITIAL_SPAN);
        for _ in 0..7 {
            let span = s.span();
            s.answered(span, 10);
        }
        assert_eq!(s.span(), 1000);
        assert_eq!(s.refused(1000, RangeHint::TooLarge), 500);
        assert_eq!(s.refused(500, RangeHint::MaxSpan(100)), 100);
        assert_eq!(s.refused(100, RangeHint::Suggested { from: 7, to: 16 }), 10);
        s.answered(10, 3);
        assert_eq!(s.span(), 20);
        s.answered(20, 5000);
        assert_eq!(s.span(), 20, "a big answer does not grow the span");
        s.answered(20, 50_000);
        assert_eq!(s.span(), 2, "a huge answer shrinks it to what would have held TARGET_ANSWER");
        s.answered(2, 5);
        for _ in 0..10 {
            let span = s.span();
            s.answered(span, 0);
        }
        assert_eq!(s.span(), 1000, "never above the maximum");
    }

    proptest! {
        /// Whatever a provider says, a refused range is followed by a strictly smaller one (down
        /// to 1) and the span stays within 1..=max.
        #[test]
        fn refusals_always_make_progress(
            max in 1u64..100_000,
            events in proptest::collection::vec((0u8..4, 0u64..200_000, 0u64..200_000, 0usize..3000), 1..50),
        ) {
            let mut s = RangeSizer::new(max);
            for (kind, a, b, logs) in events {
                let requested = s.span();
                match kind {
                    0 => s.answered(requested, logs),
                    _ => {
                        let hint = match kind {
                            1 => RangeHint::TooLarge,
                            2 => RangeHint::MaxSpan(a),
                            _ => RangeHint::Suggested { from: a, to: b },
                        };
                        let next = s.refused(requested, hint);
                        prop_assert!(next < requested || requested == 1, "{requested} -> {next}");
                    }
                }
                prop_assert!((1..=max).contains(&s.span()));
            }
        }
    }
}
