//! KV-cache events: what each model server reports it holds, as opposed to
//! the prefix index's guess from routing decisions.
//!
//! vLLM (and SGLang) publish every block they store or evict on a ZeroMQ PUB
//! socket. This subsystem decodes those batches (`decode`, over the bounded
//! reader in `msgpack`).
//!
//! The scheduler reads it through each endpoint's `KvEventsCell`, matching
//! a tokenized prompt's block keys (`scheduling::precise`).

pub mod decode;
pub mod index;
mod msgpack;
pub mod subscriber;
pub mod zmtp;

pub use decode::{Batch, DecodeError, Event, Medium, decode_into};
pub use index::{Applied, BlockIndex, PrefixMatch, block_keys, chain_seed};
pub use msgpack::MsgpackError;
