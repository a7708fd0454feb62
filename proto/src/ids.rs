//! Validated identifiers.
//!
//! Ids appear in etcd keys, NATS subjects and message ids, so they are restricted to
//! `[a-z0-9_-]{1,64}`: no separators of any of those namespaces (`/`, `.`, `:`), no
//! wildcards, nothing that needs escaping.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// An EVM chain id (EIP-155).
pub type ChainId = u64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("must not be empty")]
    Empty,
    /// The id is longer than [`MAX_ID_LEN`].
    #[error("must be at most {MAX_ID_LEN} characters, got {0}")]
    TooLong(usize),
    /// The id contains a character outside `[a-z0-9_-]`.
    #[error("must match [a-z0-9_-]{{1,64}}; {0:?} is not allowed")]
    BadChar(char),
}

/// Longest id accepted.
pub const MAX_ID_LEN: usize = 64;

fn validate_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    match s.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-')) {
        Some(c) => Err(IdError::BadChar(c)),
        None => Ok(()),
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate_id(&s)?;
                Ok(Self(s))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// Identifies a subscription cluster-wide; chosen by the app that registers it.
    SubscriptionId
);
id_type!(
    /// Identifies a worker process; stable across its restarts (e.g. the pod name).
    WorkerId
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        assert!(SubscriptionId::new("usdc-transfers_1").is_ok());
        assert!(WorkerId::new("worker-0").is_ok());
        assert!(SubscriptionId::new("a".repeat(64)).is_ok());
    }

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(SubscriptionId::new(""), Err(IdError::Empty));
        assert_eq!(SubscriptionId::new("a".repeat(65)), Err(IdError::TooLong(65)));
        assert_eq!(SubscriptionId::new("a/b"), Err(IdError::BadChar('/')));
        assert_eq!(SubscriptionId::new("a.b"), Err(IdError::BadChar('.')));
        assert_eq!(SubscriptionId::new("Upper"), Err(IdError::BadChar('U')));
        assert_eq!(SubscriptionId::new("a*"), Err(IdError::BadChar('*')));
    }

    #[test]
    fn deserialising_validates() {
        assert!(serde_json::from_str::<SubscriptionId>("\"ok-1\"").is_ok());
        let err = serde_json::from_str::<SubscriptionId>("\"not ok\"").unwrap_err();
        assert!(err.to_string().contains("[a-z0-9_-]"), "{err}");
    }

    proptest! {
        #[test]
        fn valid_ids_round_trip(s in "[a-z0-9_-]{1,64}") {
            let id = SubscriptionId::new(s.clone()).unwrap();
            prop_assert_eq!(id.as_str(), s.as_str());
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<SubscriptionId>(&json).unwrap(), id);
        }
    }
}
