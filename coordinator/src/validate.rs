//! Validation of subscription requests. Pure: request bytes and the known chains in, a spec or
//! an [`ApiError`] naming the field out. Nothing that fails here ever reaches etcd.

use std::collections::BTreeMap;

use alloy_json_abi::{Event, JsonAbi};
use alloy_primitives::Address;
use herald_proto::subscription::MAX_CONFIRMATIONS;
use herald_proto::{
    ChainId, EventDefinition, Finality, StartBlock, SubscriptionId, SubscriptionSpec, subjects,
};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::api::error::ApiError;

/// Body of `POST /v1/subscriptions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    /// Cluster-wide id, `[a-z0-9_-]{1,64}`.
    #[schema(pattern = "^[a-z0-9_-]{1,64}$", example = "usdc-transfers")]
    pub id: String,
    /// EIP-155 chain id; must be one the coordinator is configured with.
    #[schema(minimum = 0)]
    pub chain_id: u64,
    /// Contract address, `0x` + 40 hex digits; mixed case must be a valid EIP-55 checksum.
    #[schema(example = "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48")]
    pub address: String,
    /// The event: a human-readable signature (`event Transfer(address indexed from, ...)`),
    /// a JSON ABI event fragment, or, when `abi` is given, the event's name.
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
    /// A full contract ABI; `event` then names one of its events.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub abi: Option<serde_json::Value>,
    /// Indexed-argument filters: parameter name -> accepted values.
    #[serde(default)]
    pub filters: BTreeMap<String, Vec<String>>,
    /// First block: a number, a decimal string, or `"latest"` (the default).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub start_block: Option<serde_json::Value>,
    /// Blocks a log must be below the head before it is published.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 10000)]
    pub confirmations: u64,
    /// Also wait until the chain tags the block `safe` or `finalized` (where it has the tags).
    #[serde(default)]
    pub finality: Option<FinalityTag>,
    /// Subject to publish to; defaults to `herald.events.<chain_id>.<id>`.
    #[serde(default)]
    pub subject: Option<String>,
}

/// `finality` of a create request.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinalityTag {
    /// The chain's `safe` block.
    Safe,
    /// The chain's `finalized` block.
    Finalized,
}

impl From<FinalityTag> for Finality {
    fn from(tag: FinalityTag) -> Self {
        match tag {
            FinalityTag::Safe => Self::Safe,
            FinalityTag::Finalized => Self::Finalized,
        }
    }
}

/// What validation needs to know about the world.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Configured chains and their last known heads.
    pub chains: BTreeMap<ChainId, Option<u64>>,
    /// How far beyond the head a start block may be.
    pub max_start_block_ahead: u64,
    /// Subject patterns of the JetStream stream; a subscription's subject must match one.
    pub stream_subjects: Vec<String>,
}

/// Parses and validates a create request.
pub fn create(body: &[u8], ctx: &Context) -> Result<SubscriptionSpec, ApiError> {
    let request: CreateSubscription = parse_body(body)?;
    let id = SubscriptionId::new(request.id.clone())
        .map_err(|e| ApiError::invalid("invalid_id", "id", format!("id {e}")))?;
    let head = match ctx.chains.get(&request.chain_id) {
        Some(head) => *head,
        None => {
            let known: Vec<String> = ctx.chains.keys().map(u64::to_string).collect();
            return Err(ApiError::invalid(
                "unknown_chain",
                "chain_id",
                format!("chain {} is not served; known chains: [{}]", request.chain_id, known.join(", ")),
            ));
        }
    };
    let address = parse_address(&request.address)?;
    let event = parse_event(&request.event, request.abi.as_ref())?;
    let start_block = parse_start_block(request.start_block.as_ref(), head, ctx.max_start_block_ahead)?;
    if request.confirmations > MAX_CONFIRMATIONS {
        return Err(ApiError::invalid(
            "invalid_confirmations",
            "confirmations",
            format!("must be at most {MAX_CONFIRMATIONS}"),
        ));
    }
    if let Some(subject) = &request.subject {
        subjects::validate_publish_subject(subject)
            .map_err(|e| ApiError::invalid("invalid_subject", "subject", e.to_string()))?;
        if !ctx.stream_subjects.iter().any(|p| subjects::subject_matches(p, subject)) {
            return Err(ApiError::invalid(
                "invalid_subject",
                "subject",
                format!("{subject:?} is outside the stream's subjects {:?}", ctx.stream_subjects),
            ));
        }
    }
    let spec = SubscriptionSpec {
        id,
        chain_id: request.chain_id,
        address,
        event: EventDefinition::Fragment(event).into(),
        filters: request.filters.into(),
        start_block,
        confirmations: request.confirmations,
        finality: request.finality.map(Finality::from),
        subject: request.subject,
    };
    spec.compile().map_err(|e| {
        let code = if e.field.starts_with("filters") { "invalid_filter" } else { "invalid_event" };
        ApiError::invalid(code, e.field, e.message)
    })?;
    Ok(spec)
}

/// Body of `POST /v1/subscriptions/{id}/rewind`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RewindRequest {
    /// First block to deliver again.
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    pub from_block: u64,
}

/// Parses a rewind request.
pub fn rewind(body: &[u8]) -> Result<RewindRequest, ApiError> {
    let request: RewindRequest = parse_body(body)?;
    if request.from_block > i64::MAX as u64 {
        return Err(ApiError::invalid("invalid_from_block", "from_block", "must be at most 2^63 - 1"));
    }
    Ok(request)
}

/// Deserialises a JSON body, mapping serde's errors to field-naming API errors.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid("invalid_type", "", "body must be a JSON object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let backticked = || message.split('`').nth(1).unwrap_or_default().to_owned();
        let join =
            |name: String| if path == "." || path.is_empty() { name } else { format!("{path}.{name}") };
        if message.starts_with("unknown field") {
            // serde_path_to_error's path already ends with the unknown field.
            let field = if path == "." || path.is_empty() { backticked() } else { path };
            ApiError::invalid("unknown_field", field, message)
        } else if message.starts_with("missing field") {
            ApiError::invalid("missing_field", join(backticked()), message)
        } else {
            ApiError::invalid("invalid_type", path, message)
        }
    })
}

fn parse_address(s: &str) -> Result<Address, ApiError> {
    let hex = s.strip_prefix("0x").unwrap_or("");
    if hex.len() != 40 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::invalid("invalid_address", "address", "must be 0x followed by 40 hex digits"));
    }
    let mixed = hex.chars().any(|c| c.is_ascii_lowercase()) && hex.chars().any(|c| c.is_ascii_uppercase());
    if mixed {
        return Address::parse_checksummed(s, None).map_err(|_| {
            ApiError::invalid("checksum_mismatch", "address", "mixed-case address fails its EIP-55 checksum")
        });
    }
    s.parse().map_err(|_| ApiError::invalid("invalid_address", "address", "not an address"))
}

fn parse_event(event: &serde_json::Value, abi: Option<&serde_json::Value>) -> Result<Event, ApiError> {
    if let Some(abi) = abi {
        let abi: JsonAbi = serde_json::from_value(abi.clone())
            .map_err(|e| ApiError::invalid("invalid_abi", "abi", format!("not a JSON ABI: {e}")))?;
        let name = event.as_str().ok_or_else(|| {
            ApiError::invalid(
                "invalid_event",
                "event",
                "with `abi`, `event` is the name of one of its events",
            )
        })?;
        let candidates = abi.events.get(name).map(Vec::as_slice).unwrap_or_default();
        return match candidates {
            [event] => Ok(event.clone()),
            [] => Err(ApiError::invalid(
                "event_not_found",
                "event",
                format!("the ABI has no event named {name:?}"),
            )),
            _ => Err(ApiError::invalid(
                "ambiguous_event",
                "event",
                format!("the ABI has several events named {name:?}; pass the signature instead"),
            )),
        };
    }
    let definition = match event {
        serde_json::Value::String(s) => EventDefinition::Signature(s.clone()),
        serde_json::Value::Object(_) => {
            EventDefinition::Fragment(serde_json::from_value(event.clone()).map_err(|e| {
                ApiError::invalid("invalid_event", "event", format!("not an ABI event fragment: {e}"))
            })?)
        }
        _ => {
            return Err(ApiError::invalid(
                "invalid_event",
                "event",
                "must be a signature string or an ABI fragment",
            ));
        }
    };
    definition.parse().map_err(|e| ApiError::invalid("invalid_event", "event", e.message))
}

fn parse_start_block(
    value: Option<&serde_json::Value>,
    head: Option<u64>,
    max_ahead: u64,
) -> Result<StartBlock, ApiError> {
    let bad =
        || ApiError::invalid("invalid_start_block", "start_block", "must be a block number or \"latest\"");
    let block = match value {
        None | Some(serde_json::Value::Null) => return Ok(StartBlock::Latest),
        Some(serde_json::Value::String(s)) if s == "latest" => return Ok(StartBlock::Latest),
        Some(serde_json::Value::String(s)) => s.parse::<u64>().map_err(|_| bad())?,
        Some(serde_json::Value::Number(n)) => n.as_u64().ok_or_else(bad)?,
        Some(_) => return Err(bad()),
    };
    if let Some(head) = head
        && block > head.saturating_add(max_ahead)
    {
        return Err(ApiError::invalid(
            "start_block_too_far",
            "start_block",
            format!("block {block} is more than {max_ahead} blocks beyond the head ({head})"),
        ));
    }
    Ok(StartBlock::Number(block))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            chains: [(1, Some(1000)), (10, None)].into(),
            max_start_block_ahead: 100,
            stream_subjects: vec!["herald.events.>".into(), "apps.*.events".into()],
        }
    }

    fn body(change: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
        let mut v = serde_json::json!({
            "id": "usdc", "chain_id": 1,
            "address": "0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48",
            "event": "event Transfer(address indexed from, address indexed to, uint256 value)",
        });
        change(v.as_object_mut().unwrap());
        serde_json::to_vec(&v).unwrap()
    }

    fn err(b: Vec<u8>) -> (u16, &'static str, Option<String>) {
        let e = create(&b, &ctx()).unwrap_err();
        (e.status.as_u16(), e.code, e.field)
    }

    #[test]
    fn a_valid_request_compiles() {
        let spec = create(&body(|_| {}), &ctx()).unwrap();
        assert_eq!(spec.start_block, StartBlock::Latest);
        let spec = create(
            &body(|m| {
                m.insert("start_block".into(), 1050.into());
            }),
            &ctx(),
        )
        .unwrap();
        assert_eq!(spec.start_block, StartBlock::Number(1050));
    }

    #[test]
    fn every_rule_names_its_field() {
        use serde_json::json;
        type Change = Box<dyn FnOnce(&mut serde_json::Map<String, serde_json::Value>)>;
        let cases: Vec<(Change, (u16, &str, &str))> = vec![
            (
                Box::new(|m| {
                    m.insert("id".into(), json!("Bad Id"));
                }),
                (422, "invalid_id", "id"),
            ),
            (
                Box::new(|m| {
                    m.insert("chain_id".into(), json!(5));
                }),
                (422, "unknown_chain", "chain_id"),
            ),
            (
                Box::new(|m| {
                    m.insert("address".into(), json!("0x12"));
                }),
                (422, "invalid_address", "address"),
            ),
            (
                Box::new(|m| {
                    m.insert("address".into(), json!("0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB49"));
                }),
                (422, "checksum_mismatch", "address"),
            ),
            (
                Box::new(|m| {
                    m.insert("event".into(), json!("event Transfer(address indexed"));
                }),
                (422, "invalid_event", "event"),
            ),
            (
                Box::new(|m| {
                    m.insert("event".into(), json!("Nope"));
                    m.insert("abi".into(), json!([]));
                }),
                (422, "event_not_found", "event"),
            ),
            (
                Box::new(|m| {
                    m.insert("filters".into(), json!({"to": ["0x12"]}));
                }),
                (422, "invalid_filter", "filters.to"),
            ),
            (
                Box::new(|m| {
                    m.insert("filters".into(), json!({"value": ["1"]}));
                }),
                (422, "invalid_filter", "filters.value"),
            ),
            (
                Box::new(|m| {
                    m.insert("start_block".into(), json!(1101));
                }),
                (422, "start_block_too_far", "start_block"),
            ),
            (
                Box::new(|m| {
                    m.insert("start_block".into(), json!("soon"));
                }),
                (422, "invalid_start_block", "start_block"),
            ),
            (
                Box::new(|m| {
                    m.insert("start_block".into(), json!(-1));
                }),
                (422, "invalid_start_block", "start_block"),
            ),
            (
                Box::new(|m| {
                    m.insert("confirmations".into(), json!(10001));
                }),
                (422, "invalid_confirmations", "confirmations"),
            ),
            (
                Box::new(|m| {
                    m.insert("confirmations".into(), json!(-1));
                }),
                (422, "invalid_type", "confirmations"),
            ),
            (
                Box::new(|m| {
                    m.insert("subject".into(), json!("a.*"));
                }),
                (422, "invalid_subject", "subject"),
            ),
            (
                Box::new(|m| {
                    m.insert("colour".into(), json!("red"));
                }),
                (422, "unknown_field", "colour"),
            ),
            (
                Box::new(|m| {
                    m.remove("address");
                }),
                (422, "missing_field", "address"),
            ),
        ];
        for (i, (change, (status, code, field))) in cases.into_iter().enumerate() {
            assert_eq!(err(body(change)), (status, code, Some(field.to_owned())), "case {i}");
        }
    }

    #[test]
    fn start_blocks_are_not_bounded_when_the_head_is_unknown() {
        let b = body(|m| {
            m.insert("chain_id".into(), 10.into());
            m.insert("start_block".into(), 1_000_000_000.into());
        });
        assert!(create(&b, &ctx()).is_ok());
    }

    #[test]
    fn abi_and_fragment_forms_are_accepted() {
        let fragment = serde_json::json!({"type": "event", "name": "Transfer", "anonymous": false, "inputs": [
            {"name": "from", "type": "address", "indexed": true},
            {"name": "to", "type": "address", "indexed": true},
            {"name": "value", "type": "uint256", "indexed": false}]});
        let b = body(|m| {
            m.insert("event".into(), fragment.clone());
        });
        assert!(create(&b, &ctx()).is_ok());
        let b = body(|m| {
            m.insert("event".into(), "Transfer".into());
            m.insert("abi".into(), serde_json::json!([fragment]));
        });
        assert!(create(&b, &ctx()).is_ok());
    }

    #[test]
    fn subjects_must_fall_under_the_stream() {
        let ok = body(|m| {
            m.insert("subject".into(), "apps.billing.events".into());
        });
        assert!(create(&ok, &ctx()).is_ok());
        let outside = body(|m| {
            m.insert("subject".into(), "other.events".into());
        });
        assert_eq!(err(outside), (422, "invalid_subject", Some("subject".into())));
    }

    #[test]
    fn malformed_bodies_are_400() {
        let e = create(b"{not json", &ctx()).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, "invalid_json"));
        let e = create(b"[]", &ctx()).unwrap_err();
        assert_eq!(e.code, "invalid_type");
    }
}
