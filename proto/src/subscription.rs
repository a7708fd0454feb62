//! What an app registers, and how it compiles into a log matcher.
//!
//! A [`SubscriptionSpec`] is stored verbatim in etcd (JSON). Before anything acts on it, it is
//! compiled by [`SubscriptionSpec::compile`] into a [`CompiledEvent`]: the parsed event, its
//! topic0 and the indexed-argument filters encoded as topics. Compilation is the single
//! validation path: the admin API rejects what does not compile (naming the field) and the
//! worker never sees a spec it cannot match logs against.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use alloy_dyn_abi::{DynSolType, DynSolValue};
use alloy_json_abi::Event;
use alloy_primitives::{Address, B256, keccak256};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{ChainId, SubscriptionId};
use crate::subjects;

/// Largest confirmation depth herald accepts.
pub const MAX_CONFIRMATIONS: u64 = 10_000;

/// One registered interest: event `event` of contract `address` on chain `chain_id`,
/// from `start_block` on, published once `confirmations` blocks deep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// Cluster-wide id, chosen by the app.
    pub id: SubscriptionId,
    /// Chain to follow.
    pub chain_id: ChainId,
    /// Contract whose logs are wanted.
    pub address: Address,
    /// The event, as a human-readable signature or a JSON ABI fragment. Shared: a worker
    /// keeps one copy of each distinct definition for all the subscriptions that use it.
    pub event: Arc<EventDefinition>,
    /// Indexed-argument filters: parameter name -> accepted values (any of them matches).
    /// Values are written as the parameter's type would be in Solidity source: `0x..` for
    /// addresses and bytes, decimal or `0x` hex for integers, `true`/`false`, plain text for
    /// strings.
    #[serde(default, skip_serializing_if = "Filters::is_empty")]
    pub filters: Filters,
    /// First block to deliver.
    #[serde(default)]
    pub start_block: StartBlock,
    /// How many blocks below the head a log must be before it is published.
    #[serde(default)]
    pub confirmations: u64,
    /// Publish only blocks the chain itself calls `safe` or `finalized` (and at least
    /// `confirmations` deep). On a chain without those block tags, `confirmations` alone applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finality: Option<Finality>,
    /// Subject to publish to; defaults to `herald.events.<chain_id>.<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

impl SubscriptionSpec {
    /// The subject this subscription publishes to.
    pub fn subject(&self) -> String {
        self.subject.clone().unwrap_or_else(|| subjects::default_subject(self.chain_id, &self.id))
    }

    /// Identity of *what* is subscribed to, independent of the id: chain, contract, event
    /// (selector and which parameters are indexed) and the filters as topics. Two specs with
    /// the same fingerprint would publish the same logs twice. Hex of a keccak256.
    pub fn fingerprint(&self, compiled: &CompiledEvent) -> String {
        let indexed: String =
            compiled.event.inputs.iter().map(|p| if p.indexed { 'i' } else { 'd' }).collect();
        let mut text = format!("{}:{:x}:{}:{indexed}", self.chain_id, self.address, compiled.selector);
        for filter in &compiled.topic_filters {
            text.push(':');
            if let Some(values) = filter {
                let mut values = values.clone();
                values.sort();
                values.dedup();
                for v in values {
                    text.push_str(&format!("{v},"));
                }
            }
        }
        alloy_primitives::hex::encode(keccak256(text.as_bytes()))
    }

    /// Key of the claim on this spec's subject (hex of a keccak256, in the same namespace as
    /// [`Self::fingerprint`]): two subscriptions never publish to one subject, so a subject's
    /// tail always belongs to one subscription.
    pub fn subject_fingerprint(&self) -> String {
        alloy_primitives::hex::encode(keccak256(format!("subject:{}", self.subject()).as_bytes()))
    }

    /// Validates the spec and compiles its event and filters.
    pub fn compile(&self) -> Result<CompiledEvent, SpecError> {
        if let Some(subject) = &self.subject {
            subjects::validate_publish_subject(subject)
                .map_err(|e| SpecError::new("subject", e.to_string()))?;
        }
        if self.confirmations > MAX_CONFIRMATIONS {
            return Err(SpecError::new(
                "confirmations",
                format!("must be at most {MAX_CONFIRMATIONS}, got {}", self.confirmations),
            ));
        }
        CompiledEvent::compile(&self.event, &self.filters)
    }
}

/// What the registry stores at `<prefix>/subscriptions/<id>`: the app's spec and the
/// operator's control state. The spec never changes after registration; `state` and `rewind`
/// do, and the owning worker restarts the subscription's task whenever the record changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionRecord {
    /// What the app registered.
    pub spec: SubscriptionSpec,
    /// Whether the subscription runs.
    #[serde(default)]
    pub state: SubscriptionState,
    /// The latest rewind request, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewind: Option<Rewind>,
    /// Registration time, Unix seconds.
    #[serde(default)]
    pub created_at: u64,
}

impl SubscriptionRecord {
    /// A new, active record for `spec`.
    pub fn new(spec: SubscriptionSpec, created_at: u64) -> Self {
        Self { spec, state: SubscriptionState::Active, rewind: None, created_at }
    }

    /// The epoch a rewind would get next.
    pub fn next_rewind_epoch(&self) -> u64 {
        self.rewind.map_or(1, |r| r.epoch + 1)
    }
}

/// Whether a subscription runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubscriptionState {
    /// Fetching and publishing.
    #[default]
    Active,
    /// Stopped by an operator; resumes from its cursor.
    Paused,
}

/// A request to replay a subscription from `from_block`.
///
/// Applied by the owning worker, never by the coordinator: when the worker starts the
/// subscription and finds a rewind whose `epoch` is above its cursor's, it moves its own cursor
/// (fenced like every cursor write) to just before `from_block` with the new epoch. The
/// coordinator therefore never races the owner's cursor writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewind {
    /// Increases with every rewind of the subscription; part of replayed messages' ids.
    pub epoch: u64,
    /// First block to deliver again. Block 0 means the same as 1 (genesis has no logs).
    pub from_block: u64,
}

/// Indexed-argument filters: parameter name -> accepted values, in name order. A JSON object
/// on the wire; in memory a sorted slice, since a worker keeps the spec of every subscription
/// it runs and a `BTreeMap` allocates a whole node (over 500 bytes) for a single filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Filters(Box<[(String, Box<[String]>)]>);

impl Filters {
    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The accepted values of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&[String]> {
        let at = self.0.binary_search_by(|(n, _)| n.as_str().cmp(name)).ok()?;
        Some(&self.0[at].1)
    }

    /// Each parameter and its accepted values, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.0.iter().map(|(name, values)| (name.as_str(), &values[..]))
    }

    /// Sets the accepted values of parameter `name`.
    pub fn insert(&mut self, name: String, values: Vec<String>) {
        let mut all: BTreeMap<String, Vec<String>> =
            self.iter().map(|(n, v)| (n.to_owned(), v.to_vec())).collect();
        all.insert(name, values);
        *self = all.into();
    }
}

impl From<BTreeMap<String, Vec<String>>> for Filters {
    fn from(map: BTreeMap<String, Vec<String>>) -> Self {
        Self(map.into_iter().map(|(name, values)| (name, values.into_boxed_slice())).collect())
    }
}

impl Serialize for Filters {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Filters {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, Vec<String>>::deserialize(deserializer).map(Self::from)
    }
}

/// How the event is described.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventDefinition {
    /// Human-readable, e.g. `event Transfer(address indexed from, address indexed to, uint256 value)`
    /// (the leading `event` is optional).
    Signature(String),
    /// A JSON ABI fragment, `{"type": "event", "name": ..., "inputs": [...]}`.
    Fragment(Event),
}

impl EventDefinition {
    /// Parses the definition into an ABI event.
    pub fn parse(&self) -> Result<Event, SpecError> {
        match self {
            Self::Signature(sig) => {
                let sig = sig.trim();
                let full = if sig.starts_with("event ") { sig.to_owned() } else { format!("event {sig}") };
                Event::parse(&full)
                    .map_err(|e| SpecError::new("event", format!("not a valid event signature: {e}")))
            }
            Self::Fragment(event) => Ok(event.clone()),
        }
    }
}

/// A block tag a subscription can wait for before publishing (post-merge chains).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finality {
    /// The `safe` tag: justified by the beacon chain, very unlikely to reorg.
    Safe,
    /// The `finalized` tag: cannot reorg without slashing a third of the validators.
    Finalized,
}

impl Finality {
    /// The JSON-RPC block tag.
    pub fn tag(self) -> &'static str {
        match self {
            Self::Safe => "safe",
            Self::Finalized => "finalized",
        }
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartBlock {
    /// The chain head when the subscription first runs.
    #[default]
    Latest,
    /// A specific block number.
    Number(u64),
}

impl Serialize for StartBlock {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Latest => s.serialize_str("latest"),
            Self::Number(n) => s.serialize_u64(*n),
        }
    }
}

impl<'de> Deserialize<'de> for StartBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Self::Number(n)),
            Raw::Text(t) if t == "latest" => Ok(Self::Latest),
            Raw::Text(t) => t.parse().map(Self::Number).map_err(|_| {
                serde::de::Error::custom(format!(
                    "start_block must be a block number or \"latest\", got {t:?}"
                ))
            }),
        }
    }
}

/// A spec that does not validate, naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// Dotted path of the field, e.g. `filters.to`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl SpecError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Number of indexed topics an event can have after topic0.
const INDEXED_TOPICS: usize = 3;

/// A subscription's event, ready to match and decode logs.
#[derive(Clone, PartialEq)]
pub struct CompiledEvent {
    /// The parsed event.
    pub event: Event,
    /// topic0: keccak256 of the canonical signature.
    pub selector: B256,
    /// Canonical signature, e.g. `Transfer(address,address,uint256)`.
    pub signature: String,
    /// Accepted values of topic1..topic3; `None` accepts anything.
    pub topic_filters: [Option<Vec<B256>>; INDEXED_TOPICS],
}

impl fmt::Debug for CompiledEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledEvent")
            .field("signature", &self.signature)
            .field("selector", &self.selector)
            .field("topic_filters", &self.topic_filters)
            .finish()
    }
}

impl CompiledEvent {
    /// Parses the event and encodes the filters as topics.
    pub fn compile(definition: &EventDefinition, filters: &Filters) -> Result<Self, SpecError> {
        let event = definition.parse()?;
        if event.anonymous {
            return Err(SpecError::new("event", "anonymous events have no topic0 to match"));
        }
        let indexed = event.inputs.iter().filter(|p| p.indexed).count();
        if indexed > INDEXED_TOPICS {
            return Err(SpecError::new(
                "event",
                format!("an event has at most {INDEXED_TOPICS} indexed parameters, this one has {indexed}"),
            ));
        }
        for (i, input) in event.inputs.iter().enumerate() {
            DynSolType::parse(&input.selector_type()).map_err(|e| {
                SpecError::new(format!("event.inputs[{i}]"), format!("unsupported type: {e}"))
            })?;
        }
        let mut topic_filters: [Option<Vec<B256>>; INDEXED_TOPICS] = Default::default();
        for (name, values) in filters.iter() {
            let field = format!("filters.{name}");
            let (position, param) = event
                .inputs
                .iter()
                .filter(|p| p.indexed)
                .enumerate()
                .find(|(_, p)| p.name == name)
                .ok_or_else(|| {
                    SpecError::new(&field, format!("{name:?} is not an indexed parameter of the event"))
                })?;
            if values.is_empty() {
                return Err(SpecError::new(&field, "needs at least one value"));
            }
            let ty = DynSolType::parse(&param.selector_type())
                .map_err(|e| SpecError::new(&field, e.to_string()))?;
            let topics = values
                .iter()
                .map(|v| topic_for(&ty, v).map_err(|m| SpecError::new(&field, m)))
                .collect::<Result<Vec<_>, _>>()?;
            topic_filters[position] = Some(topics);
        }
        Ok(Self { selector: event.selector(), signature: event.signature(), event, topic_filters })
    }

    /// Whether a log with these topics is one this subscription wants.
    pub fn matches_topics(&self, topics: &[B256]) -> bool {
        if topics.first() != Some(&self.selector) {
            return false;
        }
        self.topic_filters.iter().enumerate().all(|(i, accepted)| match accepted {
            None => true,
            Some(values) => topics.get(i + 1).is_some_and(|t| values.contains(t)),
        })
    }
}

/// The topic an indexed argument of type `ty` with source value `value` produces.
fn topic_for(ty: &DynSolType, value: &str) -> Result<B256, String> {
    match ty {
        DynSolType::String => Ok(keccak256(value.as_bytes())),
        DynSolType::Bytes => {
            let v = ty.coerce_str(value).map_err(|e| format!("{value:?} is not bytes: {e}"))?;
            Ok(keccak256(v.abi_encode_packed()))
        }
        DynSolType::Array(_) | DynSolType::FixedArray(..) | DynSolType::Tuple(_) => {
            Err("filtering on an indexed array or tuple is not supported".into())
        }
        _ => {
            let v: DynSolValue = ty.coerce_str(value).map_err(|e| format!("{value:?} is not a {ty}: {e}"))?;
            v.as_word().ok_or_else(|| format!("{ty} values cannot be used as a topic"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::address;

    const TRANSFER: &str = "event Transfer(address indexed from, address indexed to, uint256 value)";

    fn spec(json: serde_json::Value) -> SubscriptionSpec {
        serde_json::from_value(json).unwrap()
    }

    fn transfer_spec() -> SubscriptionSpec {
        spec(serde_json::json!({
            "id": "t", "chain_id": 1,
            "address": "0x1111111111111111111111111111111111111111",
            "event": TRANSFER,
        }))
    }

    #[test]
    fn compiles_a_signature_with_and_without_the_keyword() {
        let a = transfer_spec().compile().unwrap();
        assert_eq!(a.signature, "Transfer(address,address,uint256)");
        assert_eq!(a.selector, keccak256("Transfer(address,address,uint256)"));
        let mut s = transfer_spec();
        s.event = EventDefinition::Signature(TRANSFER.trim_start_matches("event ").into()).into();
        assert_eq!(s.compile().unwrap().selector, a.selector);
    }

    #[test]
    fn compiles_a_json_fragment() {
        let s = spec(serde_json::json!({
            "id": "t", "chain_id": 1,
            "address": "0x1111111111111111111111111111111111111111",
            "event": {"type": "event", "name": "Note", "anonymous": false, "inputs": [
                {"name": "seq", "type": "uint256", "indexed": true},
                {"name": "text", "type": "string", "indexed": false}
            ]},
            "start_block": 5, "confirmations": 2,
        }));
        let c = s.compile().unwrap();
        assert_eq!(c.signature, "Note(uint256,string)");
        assert_eq!(s.start_block, StartBlock::Number(5));
    }

    #[test]
    fn start_block_accepts_numbers_strings_and_latest() {
        let parse = |v: serde_json::Value| serde_json::from_value::<StartBlock>(v);
        assert_eq!(parse(serde_json::json!(7)).unwrap(), StartBlock::Number(7));
        assert_eq!(parse(serde_json::json!("7")).unwrap(), StartBlock::Number(7));
        assert_eq!(parse(serde_json::json!("latest")).unwrap(), StartBlock::Latest);
        let err = parse(serde_json::json!("soon")).unwrap_err().to_string();
        assert!(err.contains("start_block"), "{err}");
        assert_eq!(serde_json::to_value(StartBlock::Latest).unwrap(), "latest");
    }

    #[test]
    fn filters_become_topics_and_match() {
        let mut s = transfer_spec();
        let to = address!("0x2222222222222222222222222222222222222222");
        s.filters.insert("to".into(), vec![to.to_string()]);
        let c = s.compile().unwrap();
        assert_eq!(c.topic_filters[0], None);
        assert_eq!(c.topic_filters[1], Some(vec![to.into_word()]));
        let other = Address::repeat_byte(3).into_word();
        assert!(c.matches_topics(&[c.selector, other, to.into_word()]));
        assert!(!c.matches_topics(&[c.selector, other, other]));
        assert!(!c.matches_topics(&[B256::ZERO, other, to.into_word()]));
        assert!(!c.matches_topics(&[c.selector, other]));
    }

    #[test]
    fn string_filters_hash_the_value() {
        let mut s = transfer_spec();
        s.event = EventDefinition::Signature("event Named(string indexed name)".into()).into();
        s.filters.insert("name".into(), vec!["alice".into()]);
        assert_eq!(s.compile().unwrap().topic_filters[0], Some(vec![keccak256("alice")]));
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = transfer_spec();
        s.event = EventDefinition::Signature("event Transfer(address indexed".into()).into();
        assert_eq!(s.compile().unwrap_err().field, "event");

        let mut s = transfer_spec();
        s.filters.insert("value".into(), vec!["1".into()]);
        assert_eq!(s.compile().unwrap_err().field, "filters.value");

        let mut s = transfer_spec();
        s.filters.insert("to".into(), vec!["0x12".into()]);
        let err = s.compile().unwrap_err();
        assert_eq!(err.field, "filters.to");

        let mut s = transfer_spec();
        s.filters.insert("to".into(), vec![]);
        assert_eq!(s.compile().unwrap_err().field, "filters.to");

        let mut s = transfer_spec();
        s.event = EventDefinition::Signature(
            "event E(uint8 indexed a, uint8 indexed b, uint8 indexed c, uint8 indexed d)".into(),
        )
        .into();
        s.filters.insert("d".into(), vec!["1".into()]);
        assert_eq!(s.compile().unwrap_err().field, "event");

        let mut s = transfer_spec();
        s.subject = Some("a.*".into());
        assert_eq!(s.compile().unwrap_err().field, "subject");

        let mut s = transfer_spec();
        s.confirmations = MAX_CONFIRMATIONS + 1;
        assert_eq!(s.compile().unwrap_err().field, "confirmations");
    }

    #[test]
    fn unknown_spec_fields_are_rejected() {
        let err = serde_json::from_value::<SubscriptionSpec>(serde_json::json!({
            "id": "t", "chain_id": 1,
            "address": "0x1111111111111111111111111111111111111111",
            "event": TRANSFER, "confirmation": 3,
        }))
        .unwrap_err();
        assert!(err.to_string().contains("confirmation"), "{err}");
    }

    #[test]
    fn records_round_trip_and_count_rewinds() {
        let mut r = SubscriptionRecord::new(transfer_spec(), 7);
        assert_eq!(r.next_rewind_epoch(), 1);
        r.rewind = Some(Rewind { epoch: 1, from_block: 10 });
        r.state = SubscriptionState::Paused;
        assert_eq!(r.next_rewind_epoch(), 2);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""state":"paused""#), "{json}");
        assert_eq!(serde_json::from_str::<SubscriptionRecord>(&json).unwrap(), r);
    }

    #[test]
    fn fingerprints_ignore_the_id_and_filter_order_but_not_what_is_matched() {
        let a = transfer_spec();
        let mut b = transfer_spec();
        b.id = SubscriptionId::new("other").unwrap();
        b.confirmations = 5;
        let fp = |s: &SubscriptionSpec| s.fingerprint(&s.compile().unwrap());
        assert_eq!(fp(&a), fp(&b));
        let (x, y) = (Address::repeat_byte(1).to_string(), Address::repeat_byte(2).to_string());
        let mut c = transfer_spec();
        c.filters.insert("to".into(), vec![x.clone(), y.clone()]);
        let mut d = transfer_spec();
        d.filters.insert("to".into(), vec![y, x]);
        assert_eq!(fp(&c), fp(&d));
        assert_ne!(fp(&a), fp(&c));
        let mut e = transfer_spec();
        e.address = Address::repeat_byte(9);
        assert_ne!(fp(&a), fp(&e));
    }

    #[test]
    fn default_subject_is_derived_from_chain_and_id() {
        assert_eq!(transfer_spec().subject(), "herald.events.1.t");
    }

    #[test]
    fn filters_read_and_write_as_a_json_object_in_name_order() {
        let filters: Filters =
            serde_json::from_value(serde_json::json!({"to": ["0x2"], "from": ["0x1", "0x3"]})).unwrap();
        assert_eq!(filters.get("from"), Some(&["0x1".to_owned(), "0x3".to_owned()][..]));
        assert_eq!(filters.get("value"), None);
        assert_eq!(serde_json::to_string(&filters).unwrap(), r#"{"from":["0x1","0x3"],"to":["0x2"]}"#);
        let mut more = filters.clone();
        more.insert("amount".into(), vec!["1".into()]);
        assert_eq!(more.iter().map(|(n, _)| n).collect::<Vec<_>>(), ["amount", "from", "to"]);
        assert!(serde_json::from_value::<Filters>(serde_json::json!(["to"])).is_err());
    }
}
