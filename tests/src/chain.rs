//! Drives the test contract (`contracts/HeraldTest.sol`) on a dev chain.

use std::time::Duration;

use alloy::network::TransactionBuilder;
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::TransactionRequest;
use alloy_dyn_abi::{DynSolValue, JsonAbiExt};
use alloy_json_abi::JsonAbi;
use alloy_primitives::{Address, B256, Bytes, U256};

use crate::wait_for;

const ARTIFACT: &str = include_str!("../../contracts/out/HeraldTest.json");

/// Signature of the contract's transfer event, as a subscription names it.
pub const TRANSFER_EVENT: &str = "event Transfer(address indexed from, address indexed to, uint256 value)";
/// Signature of the contract's dynamic-types event.
pub const NOTE_EVENT: &str = "event Note(uint256 indexed seq, string text, bytes payload, uint256[] values)";

/// The k-th Transfer ever emitted by the contract: `(from, to, value)`.
pub fn expected_transfer(k: u64) -> (Address, Address, U256) {
    let from = Address::from_word(B256::from(U256::from(0x1000 + k)));
    let to = Address::from_word(B256::from(U256::from(0x2000 + k)));
    (from, to, U256::from(k))
}

/// A deployed HeraldTest contract and a funded sender.
pub struct TestChain {
    provider: RootProvider,
    abi: JsonAbi,
    from: Address,
    /// The contract's address.
    pub contract: Address,
}

impl TestChain {
    /// Deploys the contract on the chain at `url` from its first dev account.
    pub async fn deploy(url: &str) -> anyhow::Result<Self> {
        let provider = RootProvider::new_http(url.parse()?);
        let from =
            *provider.get_accounts().await?.first().ok_or_else(|| anyhow::anyhow!("no dev account"))?;
        let artifact: serde_json::Value = serde_json::from_str(ARTIFACT)?;
        let abi: JsonAbi = serde_json::from_value(artifact["abi"].clone())?;
        let code: Bytes = artifact["bytecode"].as_str().unwrap_or_default().parse()?;
        let mut chain = Self { provider, abi, from, contract: Address::ZERO };
        let tx = TransactionRequest::default().from(from).with_deploy_code(code);
        let receipt = chain.send(tx).await?;
        chain.contract =
            receipt.contract_address.ok_or_else(|| anyhow::anyhow!("deployment created no contract"))?;
        Ok(chain)
    }

    /// The contract already at `contract`, driven through the chain at `url` (e.g. an anvil
    /// forked from the one it was deployed on).
    pub async fn attach(url: &str, contract: Address) -> anyhow::Result<Self> {
        let provider = RootProvider::new_http(url.parse()?);
        let from =
            *provider.get_accounts().await?.first().ok_or_else(|| anyhow::anyhow!("no dev account"))?;
        let artifact: serde_json::Value = serde_json::from_str(ARTIFACT)?;
        let abi: JsonAbi = serde_json::from_value(artifact["abi"].clone())?;
        Ok(Self { provider, abi, from, contract })
    }

    /// The hash of block `number`, if the chain has it.
    pub async fn block_hash(&self, number: u64) -> anyhow::Result<Option<B256>> {
        let block = self.provider.get_block_by_number(number.into()).await?;
        Ok(block.map(|b| b.header.hash))
    }

    async fn send(&self, tx: TransactionRequest) -> anyhow::Result<alloy::rpc::types::TransactionReceipt> {
        let hash = self.submit(tx).await?;
        self.wait_mined(hash).await
    }

    /// Sends a transaction without waiting for it to be mined; returns its hash.
    pub async fn submit(&self, tx: TransactionRequest) -> anyhow::Result<B256> {
        Ok(*self.provider.send_transaction(tx).await?.tx_hash())
    }

    /// Waits until transaction `hash` is mined and checks that it succeeded.
    pub async fn wait_mined(&self, hash: B256) -> anyhow::Result<alloy::rpc::types::TransactionReceipt> {
        let receipt = wait_for("a transaction receipt", Duration::from_secs(30), || async {
            self.provider.get_transaction_receipt(hash).await.ok().flatten()
        })
        .await?;
        anyhow::ensure!(receipt.status(), "transaction {hash} reverted");
        Ok(receipt)
    }

    fn call_tx(&self, function: &str, args: &[DynSolValue]) -> anyhow::Result<TransactionRequest> {
        let f = self
            .abi
            .function(function)
            .and_then(|f| f.first())
            .ok_or_else(|| anyhow::anyhow!("no {function}"))?;
        let input = f.abi_encode_input(args)?;
        Ok(TransactionRequest::default().from(self.from).to(self.contract).with_input(input))
    }

    async fn call(&self, function: &str, args: &[DynSolValue]) -> anyhow::Result<u64> {
        let receipt = self.send(self.call_tx(function, args)?).await?;
        Ok(receipt.block_number.unwrap_or_default())
    }

    /// The transaction of `emit_many(n)`, to submit or to put into a reorg.
    pub fn emit_many_tx(&self, n: u64) -> anyhow::Result<TransactionRequest> {
        self.call_tx("emitMany", &[DynSolValue::Uint(U256::from(n), 256)])
    }

    /// The transaction of `emit_note(text, payload, values)`.
    pub fn emit_note_tx(
        &self,
        text: &str,
        payload: &[u8],
        values: &[u64],
    ) -> anyhow::Result<TransactionRequest> {
        let values = values.iter().map(|v| DynSolValue::Uint(U256::from(*v), 256)).collect();
        self.call_tx(
            "emitNote",
            &[
                DynSolValue::String(text.into()),
                DynSolValue::Bytes(payload.to_vec()),
                DynSolValue::Array(values),
            ],
        )
    }

    /// The contract's ABI as JSON (what a subscription's `abi` field takes).
    pub fn abi_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.abi).unwrap_or_default()
    }

    /// Emits `n` Transfers in one transaction; returns its block.
    pub async fn emit_many(&self, n: u64) -> anyhow::Result<u64> {
        self.call("emitMany", &[DynSolValue::Uint(U256::from(n), 256)]).await
    }

    /// Emits one Note; returns its block.
    pub async fn emit_note(&self, text: &str, payload: &[u8], values: &[u64]) -> anyhow::Result<u64> {
        let receipt = self.send(self.emit_note_tx(text, payload, values)?).await?;
        Ok(receipt.block_number.unwrap_or_default())
    }

    /// Emits a log with Transfer's topic0 that does not decode as a Transfer.
    pub async fn emit_malformed_transfer(&self) -> anyhow::Result<u64> {
        self.call("emitMalformedTransfer", &[]).await
    }

    /// Replaces the last `depth` blocks (`anvil_reorg`) with new ones holding `emit_many(n)`
    /// transactions, one per `(n, block offset)` in `emits` (offset 0 = the first new block).
    pub async fn reorg(&self, depth: u64, emits: &[(u64, u64)]) -> anyhow::Result<()> {
        let mut txs = Vec::new();
        for &(n, offset) in emits {
            txs.push((self.emit_many_tx(n)?, offset));
        }
        self.reorg_with(depth, txs).await
    }

    /// Replaces the last `depth` blocks (`anvil_reorg`) with new ones holding `txs`, each at
    /// its block offset (0 = the first new block); the transactions may call any contract.
    pub async fn reorg_with(&self, depth: u64, txs: Vec<(TransactionRequest, u64)>) -> anyhow::Result<()> {
        let _: serde_json::Value = self.provider.raw_request("anvil_reorg".into(), (depth, txs)).await?;
        Ok(())
    }

    /// Sends a raw JSON-RPC request to the chain (e.g. `evm_setIntervalMining`).
    pub async fn raw(
        &self,
        method: &'static str,
        params: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        Ok(self.provider.raw_request(method.into(), params).await?)
    }

    /// Every log of the contract with topic0 `topic0` in `from..=to`.
    pub async fn logs(
        &self,
        topic0: B256,
        from: u64,
        to: u64,
    ) -> anyhow::Result<Vec<alloy::rpc::types::Log>> {
        let filter = alloy::rpc::types::Filter::new()
            .address(self.contract)
            .event_signature(topic0)
            .from_block(from)
            .to_block(to);
        Ok(self.provider.get_logs(&filter).await?)
    }

    /// The contract's Transfer logs on the canonical chain up to `to`, as (block hash, log index, value).
    pub async fn canonical_transfers(&self, to: u64) -> anyhow::Result<Vec<(B256, u64, U256)>> {
        let filter = alloy::rpc::types::Filter::new()
            .address(self.contract)
            .event_signature(alloy_primitives::keccak256("Transfer(address,address,uint256)"))
            .from_block(0)
            .to_block(to);
        let logs = self.provider.get_logs(&filter).await?;
        Ok(logs
            .iter()
            .map(|l| {
                let value = U256::from_be_slice(&l.data().data[..32]);
                (l.block_hash.unwrap_or_default(), l.log_index.unwrap_or_default(), value)
            })
            .collect())
    }

    /// How many of the contract's Transfer logs `eth_getLogs` returns for `from..=to` (raw
    /// endpoint throughput, for benchmarks).
    pub async fn count_transfers(&self, from: u64, to: u64) -> anyhow::Result<usize> {
        let filter = alloy::rpc::types::Filter::new()
            .address(self.contract)
            .event_signature(alloy_primitives::keccak256("Transfer(address,address,uint256)"))
            .from_block(from)
            .to_block(to);
        Ok(self.provider.get_logs(&filter).await?.len())
    }

    /// Mines `n` empty blocks.
    pub async fn mine(&self, n: u64) -> anyhow::Result<()> {
        for _ in 0..n {
            let _: serde_json::Value = self.provider.raw_request("evm_mine".into(), ()).await?;
        }
        Ok(())
    }

    /// The head block number.
    pub async fn head(&self) -> anyhow::Result<u64> {
        Ok(self.provider.get_block_number().await?)
    }
}
