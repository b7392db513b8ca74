//! Flags of the KV-cache event subscriptions (`--kv-events*`), flattened
//! into [`Flags`](super::Flags). The endpoints file (`kvEvents:`) and pod
//! annotations (`epp/kv-events-*`) override the port, replay port, topic
//! and ranks per endpoint (`discovery::kv_events`).

use std::time::Duration;

use clap::{ArgAction, Args};

use super::flags::{parse_bytes, parse_duration};

/// Default of `--kv-events-max-blocks-per-rank`. An indexed block costs one
/// 24-byte node plus an entry in each of two hash maps (16 bytes and a
/// control byte, at 57-100% load): about 64 bytes, at most about 102 just
/// after the maps grow. 2^20 blocks bound one rank's index near 100 MiB in
/// the worst case, and hold 16 M tokens at vLLM's block size 16: more than
/// any single engine's GPU cache, so in practice the endpoint's own
/// `num_gpu_blocks` is the bound and this one only stops a pod that claims
/// absurd numbers.
pub const DEFAULT_MAX_BLOCKS_PER_RANK: usize = 1 << 20;

#[derive(Debug, Clone, Args)]
pub struct KvEventsFlags {
    /// Subscribe to every endpoint's KV-cache events (vLLM/SGLang `--kv-events-config` with
    /// publisher zmq) to know what each one holds.
    #[arg(long = "kv-events", default_value_t = false, action = ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", help_heading = "KV-cache events")]
    pub enabled: bool,

    /// Port of the endpoints' event PUB socket (rank 0); the endpoints file's `kvEvents.port` or
    /// the pod annotation epp/kv-events-port overrides it.
    #[arg(
        long = "kv-events-port",
        default_value_t = 5557,
        help_heading = "KV-cache events"
    )]
    pub port: u16,

    /// Port of the endpoints' replay ROUTER socket (rank 0), used to recover missed batches;
    /// 0 for none.
    #[arg(
        long = "kv-events-replay-port",
        default_value_t = 5558,
        help_heading = "KV-cache events"
    )]
    pub replay_port: u16,

    /// Topic prefix to subscribe to; empty for every topic (each endpoint has its own socket,
    /// so a per-pod topic such as llm-d's `kv@<ip>:<port>@<model>` needs no filter).
    #[arg(
        long = "kv-events-topic",
        default_value = "",
        help_heading = "KV-cache events"
    )]
    pub topic: String,

    /// Data-parallel ranks per endpoint; rank r publishes on port + r and replays on
    /// replay port + r.
    #[arg(long = "kv-events-dp-ranks", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256), help_heading = "KV-cache events")]
    pub dp_ranks: u16,

    /// Most blocks indexed per rank, whatever the endpoint reports; the endpoint's KV-cache
    /// size (num_gpu_blocks) bounds it further once scraped.
    #[arg(long = "kv-events-max-blocks-per-rank", default_value_t = DEFAULT_MAX_BLOCKS_PER_RANK,
          value_parser = parse_max_blocks,
          help_heading = "KV-cache events")]
    pub max_blocks_per_rank: usize,

    /// How long connecting and the ZeroMQ handshake may take before retrying.
    #[arg(long = "kv-events-handshake-timeout", default_value = "2s",
          value_parser = parse_duration, help_heading = "KV-cache events")]
    pub handshake_timeout: Duration,

    /// Largest event message accepted; a larger one drops the connection and is counted as a
    /// protocol error.
    #[arg(long = "kv-events-max-message-bytes", default_value = "16MiB",
          value_parser = parse_bytes, help_heading = "KV-cache events")]
    pub max_message_bytes: u64,

    /// At startup, readiness waits for every endpoint's event stream to connect once, at most this
    /// long after the pool is synced; endpoints still unconnected then are served by the
    /// approximate index. A stream that drops later never makes the picker unready.
    #[arg(long = "kv-events-ready-timeout", default_value = "10s",
          value_parser = parse_duration, help_heading = "KV-cache events")]
    pub ready_timeout: Duration,
}

/// 1 up to what a slab index can address (2^31 - 2).
fn parse_max_blocks(text: &str) -> Result<usize, String> {
    let n: usize = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of blocks"))?;
    if (1..=(1 << 31) - 2).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is out of range 1-{}", (1usize << 31) - 2))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::Flags;

    #[test]
    fn off_by_default_with_vllm_ports() {
        let f = Flags::try_parse_from(["epp"]).unwrap().kv_events;
        assert!(!f.enabled);
        assert_eq!((f.port, f.replay_port, f.dp_ranks), (5557, 5558, 1));
        assert_eq!(f.topic, "");
        assert_eq!(f.max_blocks_per_rank, DEFAULT_MAX_BLOCKS_PER_RANK);
        assert_eq!(f.handshake_timeout, Duration::from_secs(2));
        assert_eq!(f.max_message_bytes, 16 << 20);
    }

    #[test]
    fn values_and_bounds() {
        let f = Flags::try_parse_from([
            "epp",
            "--kv-events",
            "--kv-events-port",
            "6000",
            "--kv-events-replay-port",
            "0",
            "--kv-events-topic",
            "kv@",
            "--kv-events-dp-ranks",
            "4",
            "--kv-events-max-blocks-per-rank",
            "1000",
            "--kv-events-handshake-timeout",
            "500ms",
            "--kv-events-max-message-bytes",
            "1MiB",
        ])
        .unwrap()
        .kv_events;
        assert!(f.enabled);
        assert_eq!((f.port, f.replay_port, f.dp_ranks), (6000, 0, 4));
        assert_eq!((f.topic.as_str(), f.max_blocks_per_rank), ("kv@", 1000));
        assert_eq!(f.handshake_timeout, Duration::from_millis(500));
        assert_eq!(f.max_message_bytes, 1 << 20);
        assert!(
            !Flags::try_parse_from(["epp", "--kv-events=false"])
                .unwrap()
                .kv_events
                .enabled
        );
        for bad in [
            ["--kv-events-dp-ranks", "0"],
            ["--kv-events-dp-ranks", "257"],
            ["--kv-events-max-blocks-per-rank", "0"],
        ] {
            assert!(
                Flags::try_parse_from(["epp", bad[0], bad[1]]).is_err(),
                "{bad:?}"
            );
        }
    }
}
