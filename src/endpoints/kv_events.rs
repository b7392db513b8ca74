//! What an endpoint's own KV-cache events say it holds.
//!
//! The KV-event supervisor (`kv_events::supervisor`) owns the subscriptions
//! and writes here once per subscription change (an endpoint appearing, its
//! event ports changing); the per-rank indexes behind the view are updated
//! in place by the subscriber tasks. The request path loads the view (an
//! `ArcSwap` load, no lock) and asks each rank for its longest prefix.
//!
//! Invariant: a view only holds the ranks of this endpoint, so events from
//! one pod can never touch another pod's entries. `None` means no events are
//! configured for this endpoint; a view whose ranks are all unknown means
//! they are configured but not usable yet (the approximate index answers).

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::kv_events::{PrefixMatch, subscriber::RankState};

/// The subscribed ranks of one endpoint (one per data-parallel rank).
#[derive(Debug)]
pub struct KvView {
    pub ranks: Box<[Arc<RankState>]>,
}

/// The endpoint's current view, replaced whole by the supervisor.
#[derive(Debug, Default)]
pub struct KvEventsCell {
    view: ArcSwapOption<KvView>,
}

impl KvEventsCell {
    pub fn set(&self, view: Option<Arc<KvView>>) {
        self.view.store(view);
    }

    pub fn view(&self) -> Option<Arc<KvView>> {
        self.view.load_full()
    }

    /// Whether events are configured for this endpoint.
    pub fn configured(&self) -> bool {
        self.view.load().is_some()
    }

    /// The block size the endpoint's events use, once a rank has reported one.
    pub fn block_size(&self) -> Option<u32> {
        let g = self.view.load();
        g.as_ref()?.ranks.iter().find_map(|r| r.block_size())
    }

    /// The longest prefix of `keys` cached on any known rank (a request goes
    /// to one rank, and vLLM's data-parallel front end prefers the one
    /// holding its prefix), or `None` when no rank is known.
    pub fn longest_prefix(&self, keys: &[u64]) -> Option<PrefixMatch> {
        self.longest_prefix_near(keys, 0)
    }

    /// [`Self::longest_prefix`], probing around `hint` blocks first (another
    /// endpoint's answer for the same chain); the answer does not depend on it.
    pub fn longest_prefix_near(&self, keys: &[u64], hint: usize) -> Option<PrefixMatch> {
        let g = self.view.load();
        let view = g.as_ref()?;
        let mut best: Option<PrefixMatch> = None;
        for r in view.ranks.iter() {
            if let Some(m) = r.longest_prefix_near(keys, hint) {
                best = Some(match best {
                    Some(b) if (b.gpu, b.any) >= (m.gpu, m.any) => b,
                    _ => m,
                });
            }
        }
        best
    }
}
