//! KV-event payloads as a publisher (or anything on the events port) could
//! send them, decoded and applied to a small per-rank index.
//!
//! Input: the first byte picks the index capacity (1..=32); the rest is a
//! stream of payloads separated by `c1 c1 c1` (0xc1 is MessagePack's
//! reserved marker, so no valid payload contains it). Checks, beyond "no
//! panic": the index invariants after every payload (see
//! `kv_events::index`), never more blocks than the capacity, and decoding is
//! deterministic when the batch is reused (the reused vectors hold no stale
//! state). tests/fuzz_regressions.rs runs the same checks over the corpus.
#![no_main]

use epp::kv_events::{Batch, BlockIndex, decode_into};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cap, rest)) = data.split_first() else {
        return;
    };
    let capacity = usize::from(cap % 32) + 1;
    let mut index = BlockIndex::new(capacity);
    let (mut batch, mut again) = (Batch::default(), Batch::default());
    for payload in split(rest) {
        let first = decode_into(payload, &mut batch);
        let second = decode_into(payload, &mut again);
        assert_eq!(
            first.is_ok(),
            second.is_ok(),
            "decoding is not deterministic"
        );
        if first.is_err() {
            continue;
        }
        assert_eq!(batch, again, "a reused batch decoded differently");
        index.apply(&batch);
        if let Err(e) = index.check_invariants() {
            panic!("index invariant broken: {e}");
        }
        assert!(index.len() <= capacity);
    }
});

fn split(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let d = rest?;
        match d.windows(3).position(|w| w == [0xc1, 0xc1, 0xc1]) {
            Some(i) => {
                rest = Some(&d[i + 3..]);
                Some(&d[..i])
            }
            None => {
                rest = None;
                Some(d)
            }
        }
    })
}
