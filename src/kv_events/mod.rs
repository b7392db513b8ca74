//! KV-cache events: what each model server reports it holds, as opposed to
//! the prefix index's guess from routing decisions.
//!
//! vLLM (and SGLang) publish every block they store or evict on a ZeroMQ PUB
//! socket. This subsystem decodes those batches (`decode`, over the bounded
//! reader in `msgpack`) into one [`BlockIndex`] per endpoint and rank
//! (`subscriber`), started and stopped with the endpoints by `supervisor`,
//! published in each endpoint's `kv_events` cell and shown by `metrics`.

pub mod decode;
pub mod index;
pub mod metrics;
mod msgpack;
pub mod subscriber;
pub mod supervisor;
pub mod zmtp;

pub use decode::{Batch, DecodeError, Event, Medium, decode_into};
pub use index::{Applied, BlockIndex, PrefixMatch, block_keys, chain_seed};
pub use metrics::KvEventsMetrics;
pub use msgpack::MsgpackError;
pub use supervisor::{Supervisor, SupervisorSettings};
