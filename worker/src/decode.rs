//! Turning a raw log into an [`EventEnvelope`], with the subscription's ABI at runtime.
//!
//! Pure: no IO. A log that does not decode (wrong data length, wrong number of topics, a
//! contract that emits a same-named event with other types) still becomes an envelope, with
//! `args: null` and `decode_error` set, so it is delivered raw and flagged instead of
//! stalling the subscription or being lost.

use alloy::rpc::types::Log;
use alloy_dyn_abi::{DecodedEvent, DynSolValue, EventExt};
use alloy_json_abi::{EventParam, Param};
use herald_proto::{ChainId, CompiledEvent, EventEnvelope, SubscriptionId};
use serde_json::{Map, Value};

/// Builds the envelope of `log` for one subscription. `log` must come from
/// [`crate::chain::ChainRpc::logs`], which guarantees its block and index fields.
pub fn envelope(
    chain_id: ChainId,
    subscription_id: &SubscriptionId,
    event: &CompiledEvent,
    log: &Log,
) -> EventEnvelope {
    let topics = log.topics().to_vec();
    let data = log.data().data.clone();
    let (args, decode_error) = match event.event.decode_log_parts(topics.iter().copied(), &data) {
        Ok(decoded) => (args_to_json(&event.event.inputs, decoded), None),
        Err(e) => (Value::Null, Some(e.to_string())),
    };
    EventEnvelope {
        chain_id,
        subscription_id: subscription_id.clone(),
        address: log.address(),
        event: event.event.name.clone(),
        signature: event.signature.clone(),
        block_number: log.block_number.unwrap_or_default(),
        block_hash: log.block_hash.unwrap_or_default(),
        block_timestamp: log.block_timestamp,
        transaction_hash: log.transaction_hash.unwrap_or_default(),
        transaction_index: log.transaction_index.unwrap_or_default(),
        log_index: log.log_index.unwrap_or_default(),
        removed: false,
        registration: 0,
        rewind_epoch: 0,
        reorg_generation: 0,
        args,
        decode_error,
        topics,
        data,
    }
}

/// Turns one subscription's logs into its envelopes, stamped with the registration and
/// rewind epoch they are published under. Cheap to clone: read-ahead tasks decode on their
/// own while the subscription publishes.
#[derive(Clone)]
pub struct Decoder {
    /// The subscription's chain.
    pub chain_id: ChainId,
    /// The subscription.
    pub subscription_id: SubscriptionId,
    /// Its compiled event.
    pub event: std::sync::Arc<CompiledEvent>,
    /// Which registration of the id this is.
    pub registration: u64,
    /// The rewind epoch being published.
    pub epoch: u64,
}

impl Decoder {
    /// The envelopes of the logs whose topics match the subscription's event and filters, in
    /// the logs' order.
    pub fn envelopes(&self, logs: &[Log]) -> Vec<EventEnvelope> {
        logs.iter()
            .filter(|l| self.event.matches_topics(l.topics()))
            .map(|log| {
                let mut envelope = envelope(self.chain_id, &self.subscription_id, &self.event, log);
                envelope.registration = self.registration;
                envelope.rewind_epoch = self.epoch;
                envelope
            })
            .collect()
    }
}

/// Puts indexed and body values back in declaration order, keyed by parameter name
/// (`arg<i>` for unnamed parameters).
fn args_to_json(inputs: &[EventParam], decoded: DecodedEvent) -> Value {
    let mut indexed = decoded.indexed.into_iter();
    let mut body = decoded.body.into_iter();
    let mut args = Map::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let value = if input.indexed { indexed.next() } else { body.next() };
        let name = if input.name.is_empty() { format!("arg{i}") } else { input.name.clone() };
        args.insert(name, value.map_or(Value::Null, |v| value_to_json(&v, &input.components)));
    }
    Value::Object(args)
}

/// The JSON convention documented on [`EventEnvelope`].
fn value_to_json(value: &DynSolValue, components: &[Param]) -> Value {
    match value {
        DynSolValue::Bool(b) => Value::Bool(*b),
        DynSolValue::Int(i, _) => Value::String(i.to_string()),
        DynSolValue::Uint(u, _) => Value::String(u.to_string()),
        DynSolValue::FixedBytes(word, size) => Value::String(format!("0x{}", hex(&word[..*size]))),
        DynSolValue::Address(a) => Value::String(a.to_checksum(None)),
        DynSolValue::Function(f) => Value::String(format!("0x{}", hex(f.as_slice()))),
        DynSolValue::Bytes(b) => Value::String(format!("0x{}", hex(b))),
        DynSolValue::String(s) => Value::String(s.clone()),
        DynSolValue::Array(items) | DynSolValue::FixedArray(items) => {
            Value::Array(items.iter().map(|v| value_to_json(v, components)).collect())
        }
        DynSolValue::Tuple(items) => {
            let mut map = Map::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let component = components.get(i);
                let name = component
                    .map(|c| c.name.clone())
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| i.to_string());
                let inner = component.map_or(&[][..], |c| &c.components[..]);
                map.insert(name, value_to_json(item, inner));
            }
            Value::Object(map)
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    alloy_primitives::hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_dyn_abi::DynSolValue;
    use alloy_primitives::{Address, B256, Bytes, LogData, U256};
    use herald_proto::EventDefinition;

    fn compiled(sig: &str) -> CompiledEvent {
        CompiledEvent::compile(&EventDefinition::Signature(sig.into()), &Default::default()).unwrap()
    }

    fn log(topics: Vec<B256>, data: Vec<u8>) -> Log {
        Log {
            inner: alloy_primitives::Log {
                address: Address::repeat_byte(0x11),
                data: LogData::new_unchecked(topics, Bytes::from(data)),
            },
            block_hash: Some(B256::repeat_byte(0xbb)),
            block_number: Some(7),
            block_timestamp: Some(1_700_000_000),
            transaction_hash: Some(B256::repeat_byte(0xcc)),
            transaction_index: Some(2),
            log_index: Some(5),
            removed: false,
        }
    }

    fn sid() -> SubscriptionId {
        SubscriptionId::new("s").unwrap()
    }

    #[test]
    fn decodes_a_transfer() {
        let ev = compiled("event Transfer(address indexed from, address indexed to, uint256 value)");
        let from = Address::repeat_byte(0xaa);
        let to = Address::repeat_byte(0x0b);
        let data = DynSolValue::Uint(U256::from(10).pow(U256::from(30)), 256).abi_encode();
        let env = envelope(1, &sid(), &ev, &log(vec![ev.selector, from.into_word(), to.into_word()], data));
        assert_eq!(env.decode_error, None);
        assert_eq!(env.args["from"], from.to_checksum(None));
        assert_eq!(env.args["to"], to.to_checksum(None));
        assert_eq!(env.args["value"], "1000000000000000000000000000000");
        assert_eq!((env.block_number, env.log_index, env.transaction_index), (7, 5, 2));
        assert_eq!(env.signature, "Transfer(address,address,uint256)");
    }

    #[test]
    fn decodes_dynamic_types_in_declaration_order() {
        let ev = compiled(
            "event Note(uint256 indexed seq, string text, bytes payload, uint256[] values, (int8, bool) pair)",
        );
        let data = DynSolValue::Tuple(vec![
            DynSolValue::String("héllo".into()),
            DynSolValue::Bytes(vec![0xde, 0xad]),
            DynSolValue::Array(vec![
                DynSolValue::Uint(U256::from(1), 256),
                DynSolValue::Uint(U256::from(2), 256),
            ]),
            DynSolValue::Tuple(vec![
                DynSolValue::Int(alloy_primitives::I256::try_from(-3).unwrap(), 8),
                DynSolValue::Bool(true),
            ]),
        ])
        .abi_encode_params();
        let env = envelope(1, &sid(), &ev, &log(vec![ev.selector, B256::from(U256::from(9))], data));
        assert_eq!(env.decode_error, None, "{:?}", env.decode_error);
        assert_eq!(
            env.args,
            serde_json::json!({
                "seq": "9", "text": "héllo", "payload": "0xdead", "values": ["1", "2"],
                "pair": {"0": "-3", "1": true}
            })
        );
        let keys: Vec<_> = env.args.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["seq", "text", "payload", "values", "pair"]);
    }

    #[test]
    fn undecodable_logs_are_flagged_not_dropped() {
        let ev = compiled("event Transfer(address indexed from, address indexed to, uint256 value)");
        let l = log(vec![ev.selector, B256::ZERO, B256::ZERO], vec![0xff]);
        let env = envelope(1, &sid(), &ev, &l);
        assert_eq!(env.args, Value::Null);
        assert!(env.decode_error.is_some());
        assert_eq!(env.data.as_ref(), &[0xff]);
        assert_eq!(env.topics.len(), 3);

        let missing_topic =
            log(vec![ev.selector, B256::ZERO], DynSolValue::Uint(U256::from(1), 256).abi_encode());
        assert!(envelope(1, &sid(), &ev, &missing_topic).decode_error.is_some());
    }
}
