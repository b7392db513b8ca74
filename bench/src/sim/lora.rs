//! A pod's LoRA adapter slots: vLLM's `--max-loras`, the number of distinct
//! adapters the running batch may use.
//!
//! A slot is empty or holds one adapter, with the number of running requests
//! using it. A request for an adapter takes, in this order of preference:
//! the slot already holding it (no load); an empty slot (a load); the slot
//! of the least recently used adapter that no running request uses (a load
//! that evicts it). When every slot holds an adapter some running request
//! uses, the request cannot start and waits.
//!
//! # Invariants
//! * An adapter is in at most one slot.
//! * A slot whose adapter has users is never given to another adapter: a
//!   running request's adapter is never evicted.
//! * "Recently used" means the last time a request started or finished on
//!   the adapter (a strictly increasing tick), so among idle adapters the one
//!   whose last request ended longest ago goes first.

/// What taking a slot cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The adapter was already in a slot.
    Resident,
    /// The adapter had to be loaded, into an empty slot (`evicted: None`) or
    /// in place of an idle adapter.
    Loaded { evicted: Option<usize> },
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    adapter: usize,
    users: usize,
    last_used: u64,
}

#[derive(Debug)]
pub struct LoraSlots {
    slots: Vec<Option<Slot>>,
    tick: u64,
}

impl LoraSlots {
    pub fn new(max_loras: usize) -> Self {
        Self {
            slots: vec![None; max_loras],
            tick: 0,
        }
    }

    fn find(&self, adapter: usize) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.is_some_and(|s| s.adapter == adapter))
    }

    /// The slot a load of a new adapter would use: an empty one, else the
    /// least recently used idle one.
    fn victim(&self) -> Option<usize> {
        if let Some(i) = self.slots.iter().position(Option::is_none) {
            return Some(i);
        }
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.filter(|s| s.users == 0).map(|s| (s.last_used, i)))
            .min()
            .map(|(_, i)| i)
    }

    /// Whether a request for `adapter` could start now.
    pub fn can_acquire(&self, adapter: usize) -> bool {
        self.find(adapter).is_some() || self.victim().is_some()
    }

    /// Takes a slot for one request on `adapter`; `None` when every slot
    /// holds an adapter in use.
    pub fn acquire(&mut self, adapter: usize) -> Option<Acquired> {
        self.tick += 1;
        if let Some(slot) = self.find(adapter).and_then(|i| self.slots[i].as_mut()) {
            slot.users += 1;
            slot.last_used = self.tick;
            return Some(Acquired::Resident);
        }
        let i = self.victim()?;
        let evicted = self.slots[i].map(|s| s.adapter);
        self.slots[i] = Some(Slot {
            adapter,
            users: 1,
            last_used: self.tick,
        });
        Some(Acquired::Loaded { evicted })
    }

    /// One request on `adapter` finished (or was abandoned). The adapter
    /// stays loaded, idle once its last user is gone.
    pub fn release(&mut self, adapter: usize) {
        self.tick += 1;
        if let Some(slot) = self.find(adapter).and_then(|i| self.slots[i].as_mut()) {
            slot.users = slot.users.saturating_sub(1);
            slot.last_used = self.tick;
        }
    }

    /// Adapters with at least one running request, as a bitmask over
    /// adapter indices.
    pub fn running_mask(&self) -> u64 {
        self.slots
            .iter()
            .flatten()
            .filter(|s| s.users > 0)
            .fold(0, |m, s| m | bit(s.adapter))
    }

    /// Adapters in a slot, busy or idle, as a bitmask.
    pub fn loaded_mask(&self) -> u64 {
        self.slots
            .iter()
            .flatten()
            .fold(0, |m, s| m | bit(s.adapter))
    }
}

/// The bit of adapter `i` in a set (adapter indices are below 64, see
/// [`super::config::MAX_LORA_ADAPTERS`]).
pub fn bit(i: usize) -> u64 {
    1u64.checked_shl(u32::try_from(i).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(adapters: &[usize]) -> u64 {
        adapters.iter().fold(0, |m, &a| m | bit(a))
    }

    #[test]
    fn resident_adapters_are_shared_and_empty_slots_fill_first() {
        let mut s = LoraSlots::new(2);
        assert_eq!(s.acquire(3), Some(Acquired::Loaded { evicted: None }));
        assert_eq!(s.acquire(3), Some(Acquired::Resident));
        assert_eq!(s.acquire(5), Some(Acquired::Loaded { evicted: None }));
        assert_eq!(s.running_mask(), mask(&[3, 5]));
        assert!(!s.can_acquire(7), "both slots in use");
        assert_eq!(s.acquire(7), None);
        assert!(s.can_acquire(3), "a resident adapter always fits");
    }

    #[test]
    fn only_idle_adapters_are_evicted_least_recently_used_first() {
        let mut s = LoraSlots::new(2);
        s.acquire(0);
        s.acquire(1);
        s.release(0);
        assert_eq!(s.running_mask(), mask(&[1]));
        assert_eq!(s.loaded_mask(), mask(&[0, 1]));
        // 1 is in use, so 0 goes although 1 was loaded later.
        assert_eq!(s.acquire(2), Some(Acquired::Loaded { evicted: Some(0) }));
        assert_eq!(s.loaded_mask(), mask(&[1, 2]));
        s.release(2);
        s.release(1);
        // Both idle: 2's last request ended first, so 2 is the LRU.
        assert_eq!(s.acquire(3), Some(Acquired::Loaded { evicted: Some(2) }));
        assert_eq!(s.loaded_mask(), mask(&[1, 3]));
    }

    #[test]
    fn an_adapter_in_use_is_never_evicted() {
        let mut s = LoraSlots::new(1);
        s.acquire(0);
        s.acquire(0);
        s.release(0);
        assert_eq!(s.acquire(1), None, "one user left");
        s.release(0);
        assert_eq!(s.acquire(1), Some(Acquired::Loaded { evicted: Some(0) }));
        // Releasing an adapter that is not resident changes nothing.
        s.release(0);
        assert_eq!(s.running_mask(), mask(&[1]));
    }
}
