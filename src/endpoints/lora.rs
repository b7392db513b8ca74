//! LoRA adapters of one endpoint, from vLLM's `vllm:lora_requests_info`.
//!
//! vLLM serves an adapter under its own model name: a request whose `model`
//! names an adapter runs on the base model with that adapter loaded into one
//! of `max_lora` GPU slots. The gauge reports, in its labels, the adapters of
//! running requests and of waiting ones (comma-separated) and `max_lora`;
//! its value is the time vLLM last set it. Every distinct label combination
//! stays on the page as its own series, so the newest (largest value) is the
//! current one; the scraper picks it and hands it here as a [`LoraSeries`].
//!
//! Invariants:
//! - The scrape path allocates only when the series changed: its raw label
//!   bytes are fingerprinted and compared with the stored state's.
//! - Memory is bounded whatever a pod reports: at most [`MAX_ADAPTERS`]
//!   names of at most [`MAX_NAME_BYTES`] each are kept per list; longer
//!   names and names past the cap are counted (slots are still taken) but
//!   not stored, so a request for one of them cannot match.
//! - Readers take the state with one `ArcSwap` load, never blocking the
//!   scraper.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use arc_swap::ArcSwapOption;
use xxhash_rust::xxh3::xxh3_64;

/// Adapter names kept per list (running, waiting).
pub const MAX_ADAPTERS: usize = 64;
/// Longest adapter name kept.
pub const MAX_NAME_BYTES: usize = 256;

/// The newest `vllm:lora_requests_info` series of a page, as raw
/// (still escaped) label values borrowed from the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoraSeries<'a> {
    pub running: &'a [u8],
    pub waiting: &'a [u8],
    pub max_lora: &'a [u8],
}

impl LoraSeries<'_> {
    fn fingerprint(&self) -> u64 {
        // Lengths first, so moving bytes between labels changes the value.
        let mut h = xxh3_64(self.running) ^ (self.running.len() as u64).rotate_left(17);
        h = h.rotate_left(21) ^ xxh3_64(self.waiting) ^ (self.waiting.len() as u64);
        h.rotate_left(21) ^ xxh3_64(self.max_lora)
    }
}

/// One list of adapters (running or waiting).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adapters {
    names: Vec<Box<str>>,
    /// Distinct names listed, including those not stored.
    count: u32,
}

impl Adapters {
    fn parse(raw: &[u8]) -> Self {
        let mut out = Self::default();
        let mut unstored = 0u32;
        for item in raw.split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() {
                continue;
            }
            let name = unescape(item);
            if out.names.iter().any(|n| **n == *name) {
                continue;
            }
            if name.len() <= MAX_NAME_BYTES && out.names.len() < MAX_ADAPTERS {
                out.names.push(name.into_boxed_str());
            } else {
                unstored = unstored.saturating_add(1);
            }
        }
        let stored = u32::try_from(out.names.len()).unwrap_or(u32::MAX);
        out.count = stored.saturating_add(unstored);
        out
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| **n == *name)
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|n| &**n)
    }
}

/// Undoes the text format's label escapes (`\\`, `\"`, `\n`).
fn unescape(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(&other) => out.push(other),
            None => out.push(b'\\'),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What one endpoint reported about its adapters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoraState {
    pub running: Adapters,
    pub waiting: Adapters,
    /// GPU adapter slots (`--max-loras`); 0 when not reported.
    pub max_lora: u32,
    fingerprint: u64,
}

impl LoraState {
    pub fn from_series(s: &LoraSeries<'_>) -> Self {
        let max_lora = std::str::from_utf8(s.max_lora)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0);
        Self {
            running: Adapters::parse(s.running),
            waiting: Adapters::parse(s.waiting),
            max_lora,
            fingerprint: s.fingerprint(),
        }
    }

    /// GIE's test for room to load one more adapter: fewer adapters running
    /// and waiting than slots.
    pub fn has_free_slot(&self) -> bool {
        u64::from(self.running.len()) + u64::from(self.waiting.len()) < u64::from(self.max_lora)
    }
}

/// An endpoint's current LoRA state, swapped whole by the scraper.
///
/// `present` mirrors whether a state is stored, so the scheduler, which asks
/// for every candidate of every request, pays one relaxed load on pools
/// without LoRA instead of an `ArcSwap` load.
#[derive(Debug, Default)]
pub struct LoraCell {
    state: ArcSwapOption<LoraState>,
    present: AtomicBool,
}

impl LoraCell {
    /// The latest state; `None` when the endpoint reports no LoRA gauge.
    pub fn get(&self) -> Option<Arc<LoraState>> {
        self.state.load_full()
    }

    /// Runs `f` on the latest state without taking a reference count.
    pub fn with<R>(&self, f: impl FnOnce(Option<&LoraState>) -> R) -> R {
        if !self.present.load(Ordering::Relaxed) {
            return f(None);
        }
        f(self.state.load().as_deref())
    }

    /// Publishes what a scrape saw (`None`: no LoRA series on the page).
    /// Allocates only when it differs from what is stored.
    pub fn observe(&self, seen: Option<&LoraSeries<'_>>) {
        let current = self.state.load();
        match (seen, current.as_deref()) {
            (None, None) => {}
            (None, Some(_)) => {
                self.present.store(false, Ordering::Relaxed);
                self.state.store(None);
            }
            (Some(s), Some(c)) if c.fingerprint == s.fingerprint() => {}
            (Some(s), _) => {
                self.state.store(Some(Arc::new(LoraState::from_series(s))));
                self.present.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series<'a>(running: &'a str, waiting: &'a str, max: &'a str) -> LoraSeries<'a> {
        LoraSeries {
            running: running.as_bytes(),
            waiting: waiting.as_bytes(),
            max_lora: max.as_bytes(),
        }
    }

    #[test]
    fn parses_lists_and_slots() {
        let s = LoraState::from_series(&series("a, b,,a", "c", " 4 "));
        assert_eq!(s.running.names().collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!((s.running.len(), s.waiting.len(), s.max_lora), (2, 1, 4));
        assert!(s.has_free_slot() && s.running.contains("b") && s.waiting.contains("c"));
        assert!(!s.running.contains("c"));
        let full = LoraState::from_series(&series("a,b", "c,d", "4"));
        assert!(!full.has_free_slot());
        let bad = LoraState::from_series(&series("", "", "many"));
        assert_eq!(bad.max_lora, 0);
        assert!(!bad.has_free_slot());
        let escaped = LoraState::from_series(&series(r#"q\"x\\y"#, "", "1"));
        assert!(escaped.running.contains(r#"q"x\y"#));
    }

    #[test]
    fn memory_is_bounded_but_slots_are_counted() {
        let many: String = (0..1000).map(|i| format!("adapter-{i},")).collect();
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let s = LoraState::from_series(&series(&many, &long, "2000"));
        assert_eq!(s.running.names().count(), MAX_ADAPTERS);
        assert_eq!(s.running.len(), 1000);
        assert!(s.running.contains("adapter-0") && !s.running.contains("adapter-999"));
        assert_eq!((s.waiting.names().count(), s.waiting.len()), (0, 1));
        assert!(!s.waiting.contains(&long));
    }

    #[test]
    fn the_cell_swaps_only_on_change() {
        let cell = LoraCell::default();
        assert!(cell.get().is_none());
        cell.observe(Some(&series("a", "", "2")));
        let first = cell.get().unwrap();
        cell.observe(Some(&series("a", "", "2")));
        assert!(
            Arc::ptr_eq(&first, &cell.get().unwrap()),
            "same series: no new state"
        );
        cell.observe(Some(&series("", "a", "2")));
        let second = cell.get().unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(second.waiting.contains("a") && !second.running.contains("a"));
        cell.observe(None);
        assert!(cell.get().is_none());
        assert!(cell.with(|s| s.is_none()));
    }
}
