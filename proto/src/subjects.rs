//! NATS subjects and header names.
//!
//! A subscription publishes to `herald.events.<chain_id>.<subscription_id>` unless it names
//! its own subject. Each message carries [`MSG_ID`] (JetStream's dedup key, see
//! [`crate::EventEnvelope::msg_id`]) and a few herald headers so consumers can route without parsing JSON.

use crate::ids::{ChainId, SubscriptionId};

/// JetStream's deduplication header.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// The subscription a message belongs to.
pub const SUBSCRIPTION_HEADER: &str = "Herald-Subscription";
/// The block number of the log, decimal.
pub const BLOCK_HEADER: &str = "Herald-Block";
/// `true` when the message retracts an earlier one (its block was orphaned).
pub const REMOVED_HEADER: &str = "Herald-Removed";
/// The worker that published the message: which owner acted, for audits (`make chaos` checks
/// it against the owner keys' history).
pub const WORKER_HEADER: &str = "Herald-Worker";

/// Root of herald's default subjects.
pub const DEFAULT_SUBJECT_ROOT: &str = "herald.events";

/// The default subject of a subscription: `herald.events.<chain_id>.<subscription_id>`.
pub fn default_subject(chain_id: ChainId, id: &SubscriptionId) -> String {
    format!("{DEFAULT_SUBJECT_ROOT}.{chain_id}.{id}")
}

/// Why a string is not a subject herald can publish to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// Empty subject or empty token (`a..b`, leading or trailing dot).
    #[error("subject {0:?} has an empty token")]
    EmptyToken(String),
    /// Wildcards cannot be published to.
    #[error("subject {0:?} contains a wildcard ('*' or '>')")]
    Wildcard(String),
    /// Whitespace or control characters are not allowed in subjects.
    #[error("subject {0:?} contains whitespace or a control character")]
    BadChar(String),
    /// Longer than herald accepts.
    #[error("subject is longer than {MAX_SUBJECT_LEN} bytes")]
    TooLong,
}

/// Longest subject herald accepts.
pub const MAX_SUBJECT_LEN: usize = 255;

/// Checks that `subject` is a valid, literal (wildcard-free) NATS subject.
pub fn validate_publish_subject(subject: &str) -> Result<(), SubjectError> {
    if subject.len() > MAX_SUBJECT_LEN {
        return Err(SubjectError::TooLong);
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SubjectError::BadChar(subject.to_owned()));
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Err(SubjectError::EmptyToken(subject.to_owned()));
        }
        if token == "*" || token == ">" || token.contains(['*', '>']) {
            return Err(SubjectError::Wildcard(subject.to_owned()));
        }
    }
    Ok(())
}

/// Whether NATS subject `pattern` (with `*` for one token and a trailing `>` for one or more)
/// matches the literal `subject`.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for p in pattern.split('.') {
        match (p, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(subject_matches("herald.events.>", "herald.events.1.x"));
        assert!(!subject_matches("herald.events.>", "herald.events"));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.c.d"));
        assert!(!subject_matches("a.*", "a"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.bc"));
    }

    #[test]
    fn default_subject_is_valid() {
        let s = default_subject(31337, &SubscriptionId::new("usdc").unwrap());
        assert_eq!(s, "herald.events.31337.usdc");
        assert_eq!(validate_publish_subject(&s), Ok(()));
    }

    #[test]
    fn rejects_invalid_subjects() {
        for (bad, want) in [
            ("", SubjectError::EmptyToken(String::new())),
            ("a..b", SubjectError::EmptyToken("a..b".into())),
            (".a", SubjectError::EmptyToken(".a".into())),
            ("a.", SubjectError::EmptyToken("a.".into())),
            ("a.*", SubjectError::Wildcard("a.*".into())),
            ("a.>", SubjectError::Wildcard("a.>".into())),
            ("a b", SubjectError::BadChar("a b".into())),
        ] {
            assert_eq!(validate_publish_subject(bad), Err(want), "{bad:?}");
        }
        assert_eq!(validate_publish_subject(&"a".repeat(256)), Err(SubjectError::TooLong));
    }
}
