//! Which model names are LoRA adapters.
//!
//! vLLM serves an adapter under its own model name, so nothing in a request
//! says whether its model is the base model or an adapter. The endpoints'
//! LoRA gauges do, but only for adapters with requests running or waiting
//! at the last scrape: an adapter whose requests all finished is still
//! loaded (vLLM keeps it in its slot) yet listed nowhere. A request for it
//! is still an adapter request, which must not be sent to an endpoint that
//! would have to evict another adapter for it. So the scheduler remembers
//! the names it has seen reported for the model of a routed request.
//!
//! Only names some endpoint reported are remembered (a client cannot add
//! any), at most [`MAX_KNOWN`], the oldest forgotten first. Lookups take a
//! shared lock; the exclusive one is taken only to add a name.

use std::{
    collections::{HashSet, VecDeque},
    sync::atomic::{AtomicBool, Ordering},
};

use parking_lot::RwLock;

/// Adapter names remembered, at most.
pub const MAX_KNOWN: usize = 1024;

/// `any` spares pools without LoRA the lock on every request.
#[derive(Debug, Default)]
pub struct KnownAdapters {
    names: RwLock<Known>,
    any: AtomicBool,
}

#[derive(Debug, Default)]
struct Known {
    names: HashSet<Box<str>>,
    order: VecDeque<Box<str>>,
}

impl KnownAdapters {
    pub fn contains(&self, model: &str) -> bool {
        self.any.load(Ordering::Relaxed) && self.names.read().names.contains(model)
    }

    /// Remembers `model` as an adapter (an endpoint reported it).
    pub fn learn(&self, model: &str) {
        if self.contains(model) {
            return;
        }
        let mut k = self.names.write();
        if k.names.contains(model) {
            return;
        }
        if k.order.len() >= MAX_KNOWN
            && let Some(oldest) = k.order.pop_front()
        {
            k.names.remove(&oldest);
        }
        k.names.insert(model.into());
        k.order.push_back(model.into());
        self.any.store(true, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.names.read().names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_a_bounded_number_of_names() {
        let k = KnownAdapters::default();
        assert!(!k.contains("a"));
        k.learn("a");
        k.learn("a");
        assert!(k.contains("a"));
        assert_eq!(k.len(), 1);
        for i in 0..MAX_KNOWN {
            k.learn(&format!("n{i}"));
        }
        assert_eq!(k.len(), MAX_KNOWN);
        assert!(!k.contains("a"), "the oldest is forgotten first");
        assert!(k.contains("n0") && k.contains(&format!("n{}", MAX_KNOWN - 1)));
    }
}
