//! The queues themselves: a plain, synchronous data structure the
//! controller keeps behind one lock.
//!
//! Layout: bands by priority (highest first); in each band, lanes; in each
//! lane, an ordered map from (order key, arrival sequence) to the waiting
//! request. Under global-strict fairness a band has one lane (the order is
//! the ordering policy's across every flow, so flows need no lanes of their
//! own); under round robin each flow has its lane and the band keeps the
//! non-empty lanes in turn order. The order key is 0 for FCFS (so the
//! arrival sequence orders) and the deadline for EDF.
//!
//! Least-served fairness (ours) also gives each flow its lane, and the band
//! keeps its non-empty lanes ordered by the flow's service: the requests
//! dispatched for that flow from *any* band. Round robin is fair within a
//! band only, so a tenant that sends most of the high-priority traffic also
//! gets its full turn in the lower bands and ends with more than its
//! max-min share; counting service across bands lets the other tenants
//! catch up below. A flow that becomes active starts `leastServedHeadStart`
//! requests behind the virtual clock, the service of the flow dispatched
//! last (start-time fair queueing with a bounded head start): a flow that
//! was idle earns no credit for the time it sent nothing and cannot lock the
//! others out on its return, while a tenant sending below its fair rate,
//! whose queue empties between its requests, still goes ahead of a
//! backlogged one for its next few instead of waiting its turn behind it.
//!
//! Every operation is O(log n) in the requests of a lane, plus O(lanes of
//! the band) for removing a lane that empties out of turn (a cancelled
//! request), plus O(bands x log lanes) per dispatch under least-served
//! fairness (the flow's place in every band it waits in moves), and lanes
//! are bounded by the flow bound.
//!
//! Invariants: `len`/`bytes` (global and per band) equal the sums over the
//! items present; a lane is in a band's map iff it holds an item, and in the
//! turn order (round robin) or the service order (least served, keyed by the
//! flow's current service) iff it is in the map; a flow id is interned while
//! an item of it is queued, so flow state is bounded by `max_flows` plus the
//! shared overflow flow, whatever ids clients invent.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::config::{BandSettings, Fairness, FlowControlSettings, Ordering};

/// The lane of every request of a global-strict band, and the flow of ids
/// beyond the flow bound.
const SHARED: u32 = u32::MAX;

/// Where a queued request sits, enough to remove it in O(log n).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub priority: i32,
    lane: u32,
    order: u64,
    seq: u64,
}

/// One waiting request.
#[derive(Debug)]
pub struct Item<T> {
    pub bytes: u64,
    /// The interned flow (for round-robin lanes and for releasing the id).
    flow: u32,
    pub payload: T,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The global request or byte bound.
    Global,
    /// The band's request or byte bound.
    Band,
}

#[derive(Debug)]
struct Band<T> {
    priority: i32,
    settings: BandSettings,
    lanes: HashMap<u32, BTreeMap<(u64, u64), Item<T>>>,
    /// Round robin: the non-empty lanes, next first.
    turn: VecDeque<u32>,
    /// Least served: the non-empty lanes by (their flow's service, lane).
    by_service: BTreeSet<(u64, u32)>,
    len: u64,
    bytes: u64,
}

impl<T> Band<T> {
    fn new(priority: i32, settings: BandSettings) -> Self {
        Self {
            priority,
            settings,
            lanes: HashMap::new(),
            turn: VecDeque::new(),
            by_service: BTreeSet::new(),
            len: 0,
            bytes: 0,
        }
    }
}

/// Fairness ids interned while they have queued requests.
#[derive(Debug, Default)]
struct Flows {
    ids: HashMap<Box<str>, (u32, u64)>,
    /// Slot -> id (`None` while the slot is free): slots are dense.
    names: Vec<Option<Box<str>>>,
    free: Vec<u32>,
    next: u32,
    max: usize,
    /// Slot -> requests dispatched for the flow (from any band) since it
    /// was interned, offset by the virtual clock at that time.
    served: Vec<u64>,
    /// The shared flow's service and queued requests (it is never released).
    shared_served: u64,
    shared_refs: u64,
    /// The service of the flow dispatched last, before that dispatch.
    clock: u64,
    /// How many requests behind `clock` a flow starts when it becomes
    /// active (`leastServedHeadStart`).
    head_start: u64,
}

impl Flows {
    fn served(&self, flow: u32) -> u64 {
        if flow == SHARED {
            self.shared_served
        } else {
            self.served.get(flow as usize).copied().unwrap_or(0)
        }
    }

    /// Counts a dispatch for `flow`; returns its service before it.
    fn serve(&mut self, flow: u32) -> u64 {
        let counter = if flow == SHARED {
            &mut self.shared_served
        } else {
            match self.served.get_mut(flow as usize) {
                Some(c) => c,
                None => return 0,
            }
        };
        let before = *counter;
        *counter += 1;
        self.clock = before;
        before
    }

    fn intern(&mut self, id: &str) -> u32 {
        if let Some((slot, refs)) = self.ids.get_mut(id) {
            *refs += 1;
            return *slot;
        }
        if self.ids.len() >= self.max {
            if self.shared_refs == 0 {
                self.shared_served = self
                    .shared_served
                    .max(self.clock.saturating_sub(self.head_start));
            }
            self.shared_refs += 1;
            return SHARED;
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        self.ids.insert(id.into(), (slot, 1));
        match self.names.get_mut(slot as usize) {
            Some(n) => *n = Some(id.into()),
            None => self.names.push(Some(id.into())),
        }
        let start = self.clock.saturating_sub(self.head_start);
        match self.served.get_mut(slot as usize) {
            Some(c) => *c = start,
            None => self.served.push(start),
        }
        slot
    }

    fn release(&mut self, slot: u32) {
        if slot == SHARED {
            self.shared_refs = self.shared_refs.saturating_sub(1);
            return;
        }
        let Some(Some(name)) = self.names.get(slot as usize) else {
            return;
        };
        let gone = match self.ids.get_mut(&**name) {
            Some((_, refs)) if *refs > 1 => {
                *refs -= 1;
                false
            }
            _ => true,
        };
        if gone && let Some(name) = self.names.get_mut(slot as usize).and_then(Option::take) {
            self.ids.remove(&name);
            self.free.push(slot);
        }
    }
}

#[derive(Debug)]
pub struct Queues<T> {
    settings: FlowControlSettings,
    /// Highest priority first.
    bands: Vec<Band<T>>,
    flows: Flows,
    /// Whether any band (or the template for new ones) is least served.
    has_least_served: bool,
    len: u64,
    bytes: u64,
    seq: u64,
}

impl<T> Queues<T> {
    pub fn new(settings: FlowControlSettings) -> Self {
        let bands = settings
            .bands
            .iter()
            .map(|(p, b)| Band::new(*p, *b))
            .collect();
        let flows = Flows {
            max: settings.max_flows,
            head_start: settings.least_served_head_start,
            ..Flows::default()
        };
        let has_least_served = settings.any_band(|b| b.fairness == Fairness::LeastServed);
        Self {
            settings,
            bands,
            flows,
            has_least_served,
            len: 0,
            bytes: 0,
            seq: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Requests and bytes queued in the band of `priority`.
    #[cfg(test)]
    pub fn band_usage(&self, priority: i32) -> (u64, u64) {
        self.band_index(priority)
            .ok()
            .map_or((0, 0), |i| (self.bands[i].len, self.bands[i].bytes))
    }

    fn band_index(&self, priority: i32) -> Result<usize, usize> {
        // Sorted by descending priority.
        self.bands.binary_search_by(|b| priority.cmp(&b.priority))
    }

    /// Queues a request unless a bound refuses it. `deadline` is the EDF
    /// order key (nanoseconds on any monotonic scale; `None` sorts last).
    pub fn push(
        &mut self,
        priority: i32,
        flow_id: &str,
        bytes: u64,
        deadline: Option<u64>,
        payload: T,
    ) -> Result<Key, (Full, T)> {
        let s = &self.settings;
        if (s.max_requests > 0 && self.len + 1 > s.max_requests)
            || (s.max_bytes > 0 && self.bytes + bytes > s.max_bytes)
        {
            return Err((Full::Global, payload));
        }
        let i = match self.band_index(priority) {
            Ok(i) => i,
            Err(i) => {
                // Priorities come from InferenceObjectives (operators), not
                // from clients, so bands made from the template stay few.
                self.bands
                    .insert(i, Band::new(priority, self.settings.default_band));
                i
            }
        };
        let band = &mut self.bands[i];
        let b = &band.settings;
        if (b.max_requests > 0 && band.len + 1 > b.max_requests)
            || (b.max_bytes > 0 && band.bytes + bytes > b.max_bytes)
        {
            return Err((Full::Band, payload));
        }
        let flow = self.flows.intern(flow_id);
        let lane = match band.settings.fairness {
            Fairness::GlobalStrict => SHARED,
            Fairness::RoundRobin | Fairness::LeastServed => flow,
        };
        let order = match band.settings.ordering {
            Ordering::Fcfs => 0,
            Ordering::Edf => deadline.unwrap_or(u64::MAX),
        };
        self.seq += 1;
        let key = Key {
            priority,
            lane,
            order,
            seq: self.seq,
        };
        let items = band.lanes.entry(lane).or_default();
        if items.is_empty() {
            match band.settings.fairness {
                Fairness::GlobalStrict => {}
                Fairness::RoundRobin => band.turn.push_back(lane),
                Fairness::LeastServed => {
                    band.by_service.insert((self.flows.served(flow), lane));
                }
            }
        }
        items.insert(
            (order, key.seq),
            Item {
                bytes,
                flow,
                payload,
            },
        );
        band.len += 1;
        band.bytes += bytes;
        self.len += 1;
        self.bytes += bytes;
        Ok(key)
    }

    /// Takes the next request to dispatch: the highest non-empty band, the
    /// flow its fairness policy chooses, the head its ordering puts first.
    pub fn pop(&mut self) -> Option<(Key, Item<T>)> {
        let b = self.bands.iter().position(|b| b.len > 0)?;
        let band = &mut self.bands[b];
        let lane = match band.settings.fairness {
            Fairness::GlobalStrict => SHARED,
            Fairness::RoundRobin => band.turn.pop_front()?,
            Fairness::LeastServed => band.by_service.first()?.1,
        };
        let items = band.lanes.get_mut(&lane)?;
        let ((order, seq), item) = items.pop_first()?;
        let emptied = items.is_empty();
        if emptied {
            band.lanes.remove(&lane);
        } else if band.settings.fairness == Fairness::RoundRobin {
            band.turn.push_back(lane);
        }
        let key = Key {
            priority: band.priority,
            lane,
            order,
            seq,
        };
        band.len -= 1;
        band.bytes -= item.bytes;
        self.len -= 1;
        self.bytes -= item.bytes;
        let before = self.flows.serve(item.flow);
        if self.has_least_served {
            // The flow's place moves in every least-served band it waits in
            // (its lane there is the flow itself).
            for (i, band) in self.bands.iter_mut().enumerate() {
                if band.settings.fairness != Fairness::LeastServed
                    || !band.by_service.remove(&(before, item.flow))
                {
                    continue;
                }
                if !(i == b && emptied) {
                    band.by_service.insert((before + 1, item.flow));
                }
            }
        }
        self.flows.release(item.flow);
        Some((key, item))
    }

    /// The settings of the band [`Queues::pop`] would take from.
    pub fn head_band(&self) -> Option<&BandSettings> {
        self.bands.iter().find(|b| b.len > 0).map(|b| &b.settings)
    }

    /// Removes a request still queued (its client left, or its TTL ran
    /// out); `None` when it was dispatched already.
    pub fn remove(&mut self, key: Key) -> Option<Item<T>> {
        let i = self.band_index(key.priority).ok()?;
        let band = &mut self.bands[i];
        let items = band.lanes.get_mut(&key.lane)?;
        let item = items.remove(&(key.order, key.seq))?;
        if items.is_empty() {
            band.lanes.remove(&key.lane);
            match band.settings.fairness {
                Fairness::GlobalStrict => {}
                Fairness::RoundRobin => {
                    if let Some(pos) = band.turn.iter().position(|l| *l == key.lane) {
                        band.turn.remove(pos);
                    }
                }
                Fairness::LeastServed => {
                    band.by_service
                        .remove(&(self.flows.served(item.flow), key.lane));
                }
            }
        }
        band.len -= 1;
        band.bytes -= item.bytes;
        self.len -= 1;
        self.bytes -= item.bytes;
        self.flows.release(item.flow);
        Some(item)
    }

    /// Fairness ids tracked right now (bounded by `maxFlows`).
    #[cfg(test)]
    pub fn flows_tracked(&self) -> usize {
        self.flows.ids.len()
    }

    /// Panics where the module header's invariants do not hold.
    #[cfg(test)]
    fn check_invariants(&self) {
        let (mut len, mut bytes) = (0, 0);
        for band in &self.bands {
            let items: Vec<_> = band.lanes.values().flat_map(|l| l.values()).collect();
            assert_eq!(band.len, items.len() as u64);
            assert_eq!(band.bytes, items.iter().map(|i| i.bytes).sum::<u64>());
            assert!(band.lanes.values().all(|l| !l.is_empty()));
            len += band.len;
            bytes += band.bytes;
            match band.settings.fairness {
                Fairness::GlobalStrict => {
                    assert!(band.turn.is_empty() && band.by_service.is_empty())
                }
                Fairness::RoundRobin => {
                    let mut turn: Vec<_> = band.turn.iter().copied().collect();
                    turn.sort_unstable();
                    let mut lanes: Vec<_> = band.lanes.keys().copied().collect();
                    lanes.sort_unstable();
                    assert_eq!(turn, lanes);
                }
                Fairness::LeastServed => {
                    let mut want: Vec<_> = band
                        .lanes
                        .keys()
                        .map(|&l| (self.flows.served(l), l))
                        .collect();
                    want.sort_unstable();
                    let have: Vec<_> = band.by_service.iter().copied().collect();
                    assert_eq!(have, want);
                }
            }
        }
        assert_eq!((self.len, self.bytes), (len, bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queues(fairness: Fairness, ordering: Ordering) -> Queues<u32> {
        Queues::new(FlowControlSettings {
            default_band: BandSettings {
                fairness,
                ordering,
                ..BandSettings::default()
            },
            ..FlowControlSettings::default()
        })
    }

    fn drain(q: &mut Queues<u32>) -> Vec<u32> {
        std::iter::from_fn(|| q.pop().map(|(_, i)| i.payload)).collect()
    }

    #[test]
    fn strict_priority_between_bands_fcfs_within() {
        let mut q = queues(Fairness::GlobalStrict, Ordering::Fcfs);
        for (n, prio) in [(1, -1), (2, 0), (3, -1), (4, 5), (5, 0)] {
            q.push(prio, "", 10, None, n).unwrap();
        }
        assert_eq!((q.len(), q.bytes()), (5, 50));
        assert_eq!(drain(&mut q), [4, 2, 5, 1, 3]);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn global_strict_ignores_flows_round_robin_alternates() {
        let arrivals = [("a", 1), ("a", 2), ("a", 3), ("b", 4), ("a", 5), ("b", 6)];
        let mut strict = queues(Fairness::GlobalStrict, Ordering::Fcfs);
        let mut rr = queues(Fairness::RoundRobin, Ordering::Fcfs);
        for (flow, n) in arrivals {
            strict.push(0, flow, 1, None, n).unwrap();
            rr.push(0, flow, 1, None, n).unwrap();
        }
        assert_eq!(drain(&mut strict), [1, 2, 3, 4, 5, 6]);
        assert_eq!(drain(&mut rr), [1, 4, 2, 6, 3, 5]);
        assert_eq!(rr.flows_tracked(), 0, "flows are forgotten once empty");
    }

    #[test]
    fn edf_orders_by_deadline_and_puts_none_last() {
        let mut q = queues(Fairness::GlobalStrict, Ordering::Edf);
        for (deadline, n) in [(Some(30), 1), (None, 2), (Some(10), 3), (Some(20), 4)] {
            q.push(0, "", 1, deadline, n).unwrap();
        }
        assert_eq!(drain(&mut q), [3, 4, 1, 2]);
    }

    #[test]
    fn global_and_band_bounds_in_requests_and_bytes() {
        let mut q = Queues::new(FlowControlSettings {
            max_requests: 3,
            max_bytes: 100,
            bands: vec![(
                1,
                BandSettings {
                    max_requests: 1,
                    ..BandSettings::default()
                },
            )],
            ..FlowControlSettings::default()
        });
        q.push(1, "", 10, None, 1).unwrap();
        assert_eq!(q.push(1, "", 10, None, 2).unwrap_err(), (Full::Band, 2));
        q.push(0, "", 10, None, 3).unwrap();
        assert_eq!(q.push(0, "", 81, None, 4).unwrap_err(), (Full::Global, 4));
        q.push(0, "", 80, None, 5).unwrap();
        assert_eq!(q.push(0, "", 0, None, 6).unwrap_err(), (Full::Global, 6));
        assert_eq!(q.band_usage(0), (2, 90));
        q.pop();
        q.push(1, "", 0, None, 7).unwrap();
        assert_eq!(drain(&mut q), [7, 3, 5]);
    }

    #[test]
    fn removal_keeps_counts_and_turns() {
        let mut q = queues(Fairness::RoundRobin, Ordering::Fcfs);
        let a1 = q.push(0, "a", 5, None, 1).unwrap();
        q.push(0, "b", 5, None, 2).unwrap();
        let c1 = q.push(0, "c", 5, None, 3).unwrap();
        q.push(0, "a", 5, None, 4).unwrap();
        assert_eq!(q.remove(c1).map(|i| i.payload), Some(3));
        assert_eq!(q.remove(c1).map(|i| i.payload), None, "removed once");
        assert_eq!(q.remove(a1).map(|i| i.payload), Some(1));
        assert_eq!((q.len(), q.bytes()), (2, 10));
        // `a` keeps its turn (it still holds a request), `c` lost its own.
        assert_eq!(drain(&mut q), [4, 2]);
        assert_eq!(q.flows_tracked(), 0);
    }

    fn least_served(bands: &[i32]) -> Queues<u32> {
        least_served_with(
            bands,
            FlowControlSettings::default().least_served_head_start,
        )
    }

    fn least_served_with(bands: &[i32], head_start: u64) -> Queues<u32> {
        let band = BandSettings {
            fairness: Fairness::LeastServed,
            ..BandSettings::default()
        };
        Queues::new(FlowControlSettings {
            bands: bands.iter().map(|p| (*p, band)).collect(),
            default_band: band,
            least_served_head_start: head_start,
            ..FlowControlSettings::default()
        })
    }

    #[test]
    fn least_served_counts_service_across_bands() {
        // Flow `a` sends all the high-priority work; round robin would
        // still alternate below, least served lets `b` catch up first.
        let mut q = least_served(&[10, 0]);
        for n in 0..3 {
            q.push(10, "a", 1, None, n).unwrap();
        }
        for n in 10..14 {
            q.push(0, "a", 1, None, n).unwrap();
        }
        for n in 20..25 {
            q.push(0, "b", 1, None, n).unwrap();
        }
        q.check_invariants();
        let order = drain(&mut q);
        assert_eq!(order[..3], [0, 1, 2], "strict priority first");
        assert_eq!(order[3..6], [20, 21, 22], "b catches up on a's 3");
        // Then one each in turn (ties go to either), b's last one at the end.
        let rest: Vec<bool> = order[6..].iter().map(|n| *n >= 20).collect();
        assert_eq!(rest.iter().filter(|b| **b).count(), 2);
        assert!(rest.windows(2).take(3).all(|w| w[0] != w[1]), "{order:?}");
        q.check_invariants();
    }

    #[test]
    fn a_returning_flow_gets_a_bounded_head_start_not_credit_for_idling() {
        for head_start in [0, 4, 9] {
            let mut q = least_served_with(&[0], head_start);
            for n in 0..40 {
                q.push(0, "a", 1, None, n).unwrap();
            }
            for _ in 0..20 {
                q.pop();
            }
            // `b` was idle while `a` was served 20 times: it goes first for
            // `head_start` requests (and the tie after them), not for 20.
            for n in 100..120 {
                q.push(0, "b", 1, None, n).unwrap();
            }
            let order = drain(&mut q);
            let lead = order.iter().take_while(|n| **n >= 100).count();
            assert!(
                (head_start..=head_start + 1).contains(&(lead as u64)),
                "head start {head_start}: {order:?}"
            );
            // Then they alternate.
            let next: Vec<bool> = order[lead..lead + 6].iter().map(|n| *n >= 100).collect();
            assert!(next.windows(2).all(|w| w[0] != w[1]), "{order:?}");
            assert_eq!(q.flows_tracked(), 0);
        }
    }

    #[test]
    fn least_served_keeps_its_invariants_under_mixed_operations() {
        let mut q = least_served(&[5, 0]);
        let mut keys = Vec::new();
        // A fixed pseudo-random sequence (xorshift) of pushes, pops and
        // removals over 3 flows, 2 bands and a band made from the template.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut pushed = 0u32;
        let mut out = 0u32;
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let flow = ["a", "b", "c"][(x % 3) as usize];
            let prio = [5, 0, -3][((x >> 8) % 3) as usize];
            match (x >> 16) % 4 {
                0 | 1 => {
                    keys.push(q.push(prio, flow, x % 7, None, pushed).unwrap());
                    pushed += 1;
                }
                2 => out += u32::from(q.pop().is_some()),
                _ => {
                    if !keys.is_empty() {
                        let k = keys.swap_remove((x >> 24) as usize % keys.len());
                        out += u32::from(q.remove(k).is_some());
                    }
                }
            }
            q.check_invariants();
        }
        out += drain(&mut q).len() as u32;
        assert_eq!(out, pushed, "every request leaves exactly once");
        q.check_invariants();
        assert_eq!(q.flows_tracked(), 0);
    }

    #[test]
    fn invented_fairness_ids_share_one_flow_beyond_the_bound() {
        let mut q: Queues<u32> = Queues::new(FlowControlSettings {
            max_flows: 4,
            default_band: BandSettings {
                fairness: Fairness::RoundRobin,
                ..BandSettings::default()
            },
            ..FlowControlSettings::default()
        });
        for n in 0..1000 {
            q.push(0, &format!("tenant-{n}"), 1, None, n).unwrap();
        }
        assert_eq!(q.flows_tracked(), 4);
        assert!(q.bands[0].lanes.len() <= 5, "four flows and the shared one");
        // Four flows and the shared one take turns.
        assert_eq!(drain(&mut q)[..5], [0, 1, 2, 3, 4]);
        assert_eq!(q.flows_tracked(), 0);
    }
}
