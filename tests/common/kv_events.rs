//! vLLM's KV-event wire format, written with independent encoders (`rmpv`
//! for msgpack, the `zeromq` crate for the PUB socket), shared by the
//! subscriber tests and the end-to-end tests: batches and events in both
//! encodings (positional arrays, and maps keyed by `"type"`), and a PUB
//! socket on 127.0.0.1 sending `[topic, seq u64 BE, payload]`.

use std::net::SocketAddr;

use bytes::Bytes;
use epp::kv_events::{block_keys, chain_seed};
use rmpv::Value;
use zeromq::{PubSocket, Socket, SocketSend, ZmqMessage};

pub fn enc(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}
pub fn s(x: &str) -> Value {
    Value::from(x)
}
pub fn ints(xs: impl IntoIterator<Item = u64>) -> Value {
    Value::Array(xs.into_iter().map(Value::from).collect())
}

/// A stored event for blocks `hashes` over tokens `tokens` (block size 4).
pub fn stored(map: bool, hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> Value {
    let t = ints(tokens.iter().map(|&t| u64::from(t)));
    let p = parent.map_or(Value::Nil, Value::from);
    if map {
        Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), ints(hashes.iter().copied())),
            (s("parent_block_hash"), p),
            (s("token_ids"), t),
            (s("block_size"), Value::from(4)),
            (s("lora_id"), Value::Nil),
            (s("medium"), s("GPU")),
            (s("lora_name"), Value::Nil),
        ])
    } else {
        Value::Array(vec![
            s("BlockStored"),
            ints(hashes.iter().copied()),
            p,
            t,
            Value::from(4),
            Value::Nil,
            s("GPU"),
            Value::Nil,
        ])
    }
}
pub fn removed(map: bool, hashes: &[u64]) -> Value {
    if map {
        Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (s("block_hashes"), ints(hashes.iter().copied())),
            (s("medium"), s("GPU")),
        ])
    } else {
        Value::Array(vec![
            s("BlockRemoved"),
            ints(hashes.iter().copied()),
            s("GPU"),
        ])
    }
}
pub fn cleared(map: bool) -> Value {
    if map {
        Value::Map(vec![(s("type"), s("AllBlocksCleared"))])
    } else {
        Value::Array(vec![s("AllBlocksCleared")])
    }
}
pub fn batch(map: bool, events: Vec<Value>) -> Vec<u8> {
    let ts = Value::F64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64(),
    );
    enc(&if map {
        Value::Map(vec![(s("ts"), ts), (s("events"), Value::Array(events))])
    } else {
        Value::Array(vec![ts, Value::Array(events)])
    })
}

pub fn keys(tokens: &[u32]) -> Vec<u64> {
    let mut k = Vec::new();
    block_keys(chain_seed(None, None), tokens, 4, &mut k);
    k
}

pub struct Publisher {
    pub socket: PubSocket,
    pub addr: SocketAddr,
}

impl Publisher {
    pub async fn new() -> Self {
        let mut socket = PubSocket::new();
        let ep = socket.bind("tcp://127.0.0.1:0").await.unwrap();
        let addr = ep.to_string().trim_start_matches("tcp://").parse().unwrap();
        Self { socket, addr }
    }
    pub async fn send(&mut self, topic: &str, seq: u64, payload: Vec<u8>) {
        let m = ZmqMessage::try_from(vec![
            Bytes::from(topic.to_owned()),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            Bytes::from(payload),
        ])
        .unwrap();
        self.socket.send(m).await.unwrap();
    }
}
