//! A mirror of one watched resource: a name-keyed copy of the objects a
//! kube-runtime watcher reports, each reduced to what its user keeps.
//!
//! # Algorithm
//!
//! A watcher reports a list as `Init`, one `InitApply` per object, then
//! `InitDone`, and afterwards single changes as `Apply`/`Delete`; after an
//! error or an expired resource version it lists again the same way. The
//! mirror buffers a list's objects apart and swaps the buffer in whole at
//! `InitDone`, so a relist never shows a partial view: objects deleted while
//! the watch was down disappear at that moment, and until then the last
//! complete view stays. Single changes apply at once. `apply` tells the
//! caller when to recompute whatever it derives from the mirror: after every
//! completed (re)list, and on changes the caller deems relevant.
//!
//! # Invariants
//!
//! - `current` is always a complete list plus the single changes after it:
//!   it changes only at `InitDone` (whole) and on `Apply`/`Delete`, never
//!   on `Init`/`InitApply`.
//! - `listed` turns true at the first `InitDone` and stays true; before it,
//!   single changes never ask for a recompute (there is nothing complete to
//!   recompute from yet).
//! - Objects are keyed by `metadata.name`, so one mirror serves one
//!   namespace (names are unique there).
//! - An object that `project` rejects counts as absent: its previous value,
//!   if any, is removed, as on `Delete`.
//! - A change asks for a recompute only when the kept value actually
//!   changed, so status-only updates that the projection drops cost nothing.

use std::collections::HashMap;

use kube::{Resource, runtime::watcher::Event};

/// A name-keyed copy of a watched collection, with relists buffered and
/// swapped in whole so a relist never shows a partial view.
#[derive(Debug)]
pub(super) struct Mirror<T> {
    pub current: HashMap<String, T>,
    relist: Option<HashMap<String, T>>,
    /// The first complete list has been seen.
    pub listed: bool,
}

impl<T> Default for Mirror<T> {
    fn default() -> Self {
        Self {
            current: HashMap::new(),
            relist: None,
            listed: false,
        }
    }
}

impl<T: PartialEq> Mirror<T> {
    /// Applies one watcher event. `project` reduces an object to what is kept
    /// (`None` drops it, as if deleted); `relevant(old, new)` says whether a
    /// change of one object matters to the caller. Returns true when the
    /// caller should recompute: after every completed (re)list, and on
    /// relevant changes once listed.
    pub fn apply<K: Resource>(
        &mut self,
        event: Event<K>,
        project: impl Fn(&K) -> Option<T>,
        relevant: impl Fn(Option<&T>, Option<&T>) -> bool,
    ) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            Event::InitApply(obj) => {
                let name = obj.meta().name.clone().unwrap_or_default();
                if let (Some(relist), Some(value)) = (self.relist.as_mut(), project(&obj)) {
                    relist.insert(name, value);
                }
                false
            }
            Event::InitDone => {
                self.current = self.relist.take().unwrap_or_default();
                self.listed = true;
                true
            }
            Event::Apply(obj) => {
                let name = obj.meta().name.clone().unwrap_or_default();
                let (old, new) = match project(&obj) {
                    Some(value) => {
                        let old = self.current.insert(name.clone(), value);
                        (old, self.current.get(&name))
                    }
                    None => (self.current.remove(&name), None),
                };
                self.listed && old.as_ref() != new && relevant(old.as_ref(), new)
            }
            Event::Delete(obj) => {
                let name = obj.meta().name.clone().unwrap_or_default();
                let old = self.current.remove(&name);
                self.listed && old.is_some() && relevant(old.as_ref(), None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::discovery::kube::model::{Pod, PodView, tests::pod_json};

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn always(_: Option<&PodView>, _: Option<&PodView>) -> bool {
        true
    }

    #[test]
    fn a_relist_is_swapped_in_whole() {
        let mut m: Mirror<PodView> = Mirror::default();
        let project = |p: &Pod| Some(PodView::from_pod(p));
        assert!(!m.apply(Event::Init, project, always));
        assert!(!m.apply(
            Event::InitApply(pod(pod_json("a", "10.0.0.1", true, json!({})))),
            project,
            always
        ));
        assert!(m.current.is_empty(), "nothing visible before InitDone");
        assert!(m.apply(Event::<Pod>::InitDone, project, always));
        assert_eq!(m.current.len(), 1);

        m.apply(Event::<Pod>::Init, project, always);
        m.apply(
            Event::InitApply(pod(pod_json("b", "10.0.0.2", true, json!({})))),
            project,
            always,
        );
        assert!(
            m.current.contains_key("a"),
            "the old view stays during a relist"
        );
        m.apply(Event::<Pod>::InitDone, project, always);
        assert!(m.current.contains_key("b") && !m.current.contains_key("a"));

        let b = pod(pod_json("b", "10.0.0.2", true, json!({})));
        assert!(
            !m.apply(Event::Apply(b.clone()), project, always),
            "unchanged pod"
        );
        assert!(m.apply(Event::Delete(b.clone()), project, always));
        assert!(!m.apply(Event::Delete(b), project, always), "already gone");
    }
}
