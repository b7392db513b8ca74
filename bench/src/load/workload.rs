//! Deterministic workload generators.
//!
//! Text is made of lowercase filler words from a seeded RNG and is exactly
//! `tokens x chars_per_token` bytes long, so token counts seen by the
//! simulator (bytes / chars_per_token) are the counts asked for here. Every
//! piece of text is derived from (seed, purpose, indices) alone, so prompt i
//! is the same whatever order prompts are generated in.

use xxhash_rust::xxh3::xxh3_64_with_seed;

const VOCAB: [&str; 24] = [
    "alpha", "beta", "cache", "delta", "engine", "fleet", "gateway", "hash", "index", "judge",
    "kernel", "latency", "model", "node", "order", "prefix", "queue", "route", "score", "token",
    "user", "vector", "worker", "zone",
];

/// Seed for one piece of text, mixing the run seed with its identity.
pub fn sub_seed(seed: u64, parts: &[u64]) -> u64 {
    let mut bytes = [0u8; 8 * 8];
    let n = parts.len().min(8);
    for (i, p) in parts.iter().take(n).enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&p.to_le_bytes());
    }
    xxh3_64_with_seed(&bytes[..n * 8], seed)
}

/// Exactly `bytes` bytes of ASCII filler words.
pub fn filler_text(seed: u64, bytes: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        s.push_str(VOCAB[rng.usize(..VOCAB.len())]);
        s.push(' ');
    }
    s.truncate(bytes);
    s
}

/// Short, distinct prompts like the seed deployment's smoke test.
pub fn seed_prompt(i: usize) -> String {
    const TOPICS: [&str; 8] = [
        "load balancing",
        "prefix caching",
        "queueing theory",
        "tensor processing units",
        "KV caches",
        "request routing",
        "Kubernetes gateways",
        "token streaming",
    ];
    format!(
        "Request {i}: in one sentence, explain {}.",
        TOPICS[i % TOPICS.len()]
    )
}

/// inference-perf's `shared_prefix` data: `groups` groups of
/// `prompts_per_group` prompts; each prompt is its group's system prompt
/// (`system_tokens`) followed by its own question (`question_tokens`).
#[derive(Debug, Clone)]
pub struct SharedPrefix {
    pub groups: usize,
    pub prompts_per_group: usize,
    pub system_tokens: usize,
    pub question_tokens: usize,
    pub chars_per_token: usize,
    pub seed: u64,
    /// Random order instead of round-robin over groups.
    pub shuffle: bool,
}

impl SharedPrefix {
    pub fn len(&self) -> usize {
        self.groups * self.prompts_per_group
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (group, prompt-in-group) of every request in send order. Interleaved:
    /// round r sends prompt r of every group, so consecutive requests never
    /// share a prefix and a cache-blind router cannot get hits by accident of
    /// ordering. `shuffle` draws a seeded random permutation instead.
    pub fn order(&self) -> Vec<(usize, usize)> {
        let mut order: Vec<(usize, usize)> = (0..self.prompts_per_group)
            .flat_map(|p| (0..self.groups).map(move |g| (g, p)))
            .collect();
        if self.shuffle {
            fastrand::Rng::with_seed(sub_seed(self.seed, &[3])).shuffle(&mut order);
        }
        order
    }

    pub fn system_prompt(&self, group: usize) -> String {
        filler_text(
            sub_seed(self.seed, &[1, group as u64]),
            self.system_tokens * self.chars_per_token,
        )
    }

    /// The full prompt; `system` is the group's system prompt (cached by the
    /// caller, it is the bulk of the text).
    pub fn prompt(&self, system: &str, group: usize, index: usize) -> String {
        let q = filler_text(
            sub_seed(self.seed, &[2, group as u64, index as u64]),
            self.question_tokens * self.chars_per_token,
        );
        let mut s = String::with_capacity(system.len() + q.len());
        s.push_str(system);
        s.push_str(&q);
        s
    }

    /// The ideal hit rate of the whole workload.
    pub fn ideal_hit_rate(&self, block_size: usize) -> f64 {
        ideal_shared_prefix_hit_rate(
            self.groups,
            self.prompts_per_group,
            self.system_tokens,
            self.question_tokens,
            block_size,
        )
    }
}

/// Every repeated block a hit: for each group, the system prompt's full
/// blocks of all prompts but the first, in tokens, over all prompt tokens.
/// (Assumes `question_tokens >= 1`, so the system prompt never holds a
/// prompt's last token, which an engine always recomputes.)
pub fn ideal_shared_prefix_hit_rate(
    groups: usize,
    prompts_per_group: usize,
    system_tokens: usize,
    question_tokens: usize,
    block_size: usize,
) -> f64 {
    let total = groups * prompts_per_group * (system_tokens + question_tokens);
    if total == 0 || block_size == 0 {
        return 0.0;
    }
    let shared = (system_tokens / block_size) * block_size;
    let hits = groups * prompts_per_group.saturating_sub(1) * shared;
    hits as f64 / total as f64
}

/// The same ideal over the requests actually sent (a run cut short by
/// `--max-duration`): `sent` lists (group, prompt tokens) in send order.
pub fn ideal_hit_rate_of_sent(
    sent: impl IntoIterator<Item = (usize, usize)>,
    system_tokens: usize,
    block_size: usize,
) -> f64 {
    let shared = (system_tokens / block_size.max(1)) * block_size;
    let mut seen = std::collections::HashSet::new();
    let (mut hits, mut total) = (0usize, 0usize);
    for (group, tokens) in sent {
        total += tokens;
        if !seen.insert(group) {
            hits += shared;
        }
    }
    if total == 0 {
        0.0
    } else {
        hits as f64 / total as f64
    }
}

/// The ideal of [`ideal_hit_rate_of_sent`] for pods whose caches are
/// bounded, with an optional restart: `sent` lists (request index, group,
/// prompt tokens) in send order.
///
/// * **Restart.** Every pod is emptied before request `restart_at`: each
///   group's first request from there on misses, like its very first one.
/// * **Bounded caches.** A group's shared prefix takes `s = system_tokens /
///   block_size` blocks, so a pod of `kv_blocks` blocks can keep `floor(
///   kv_blocks / s)` groups and the fleet `K = pods x floor(kv_blocks / s)`.
///   An oracle router that knows the whole workload keeps the K groups with
///   the most repeats resident, each on a pod with room for it, and sends
///   every other group's requests where they evict none of them: its hits
///   are the repeats of those K groups only. With K >= the group count this
///   is the unbounded ideal. The bound ignores the blocks running requests
///   hold for their own question and output (a few blocks each, against
///   caches of thousands), so it is an upper bound, and a static placement:
///   for groups of equal popularity sent in random order (`--shuffle`) it
///   is also what LRU caches reach with a good router (under independent
///   uniform requests a cache of K of G groups hits K/G of the repeats,
///   whatever it evicts); for the round-robin order a pod's LRU evicts each
///   group just before its next request, so no router reaches it there.
pub fn ideal_hit_rate_bounded(
    sent: impl IntoIterator<Item = (usize, usize, usize)>,
    system_tokens: usize,
    block_size: usize,
    restart_at: Option<usize>,
    cache: Option<(usize, usize)>,
) -> f64 {
    let block_size = block_size.max(1);
    let shared_blocks = system_tokens / block_size;
    let shared = shared_blocks * block_size;
    let (mut seen, mut seen_after) = (
        std::collections::HashSet::new(),
        std::collections::HashSet::new(),
    );
    let mut hits_by_group: std::collections::HashMap<usize, usize> =
        std::collections::HashMap::new();
    let mut total = 0usize;
    for (index, group, tokens) in sent {
        total += tokens;
        let after = restart_at.is_some_and(|at| index >= at);
        let first = if after {
            seen_after.insert(group)
        } else {
            seen.insert(group)
        };
        let entry = hits_by_group.entry(group).or_default();
        if !first {
            *entry += shared;
        }
    }
    if total == 0 {
        return 0.0;
    }
    let mut hits: Vec<usize> = hits_by_group.into_values().collect();
    let resident = match cache {
        Some((pods, kv_blocks)) if shared_blocks > 0 => pods * (kv_blocks / shared_blocks),
        _ => hits.len(),
    };
    hits.sort_unstable_by(|a, b| b.cmp(a));
    hits.iter().take(resident).sum::<usize>() as f64 / total as f64
}

/// Long, unshared prompts: a per-request header first, so no two prompts
/// share even their first block, then a common body (generated once).
#[derive(Debug, Clone)]
pub struct LongPrompt {
    body: String,
}

impl LongPrompt {
    pub fn new(bytes: usize, seed: u64) -> Self {
        Self {
            body: filler_text(sub_seed(seed, &[4]), bytes),
        }
    }

    pub fn bytes(&self) -> usize {
        self.body.len()
    }

    pub fn prompt(&self, i: usize) -> String {
        let header = format!("request {i:010} ");
        let keep = self.body.len().saturating_sub(header.len());
        let mut s = String::with_capacity(self.body.len());
        s.push_str(&header);
        s.push_str(&self.body[..keep]);
        s
    }
}

/// Chat sessions that grow turn by turn.
#[derive(Debug, Clone)]
pub struct MultiTurn {
    pub sessions: usize,
    pub turns: usize,
    pub system_tokens: usize,
    pub user_tokens: usize,
    pub chars_per_token: usize,
    pub seed: u64,
}

impl MultiTurn {
    pub fn system_prompt(&self, session: usize) -> String {
        filler_text(
            sub_seed(self.seed, &[5, session as u64]),
            self.system_tokens * self.chars_per_token,
        )
    }

    pub fn user_message(&self, session: usize, turn: usize) -> String {
        filler_text(
            sub_seed(self.seed, &[6, session as u64, turn as u64]),
            self.user_tokens * self.chars_per_token,
        )
    }
}

/// Requests spread over LoRA adapters: `adapters` adapters named
/// [`LoraMix::adapter_name`], chosen with Zipf popularity (adapter k drawn
/// with weight `1 / (k + 1)^zipf`: a few popular adapters and a tail of rare
/// ones, as multi-tenant adapter serving tends to see), plus a `base_share`
/// of requests for the base model. Each target (adapter or base) has its own
/// system prompt, standing for the task its adapter was tuned for, followed
/// by a per-request question.
#[derive(Debug, Clone)]
pub struct LoraMix {
    pub adapters: usize,
    pub zipf: f64,
    pub base_share: f64,
    pub system_tokens: usize,
    pub question_tokens: usize,
    pub chars_per_token: usize,
    pub seed: u64,
}

impl LoraMix {
    pub fn adapter_name(i: usize) -> String {
        format!("lora-{i}")
    }

    pub fn adapter_names(&self) -> Vec<String> {
        (0..self.adapters).map(Self::adapter_name).collect()
    }

    /// Probability of each adapter, in index order (the rest is the base
    /// model's).
    pub fn probabilities(&self) -> Vec<f64> {
        let weights: Vec<f64> = (0..self.adapters)
            .map(|k| ((k + 1) as f64).powf(-self.zipf))
            .collect();
        let total: f64 = weights.iter().sum();
        let lora = if self.adapters == 0 {
            0.0
        } else {
            1.0 - self.base_share
        };
        weights.iter().map(|w| lora * w / total).collect()
    }

    /// The target of each of `n` requests, in send order: `Some(adapter)`
    /// or `None` for the base model. Independent draws from a seeded RNG.
    pub fn order(&self, n: usize) -> Vec<Option<usize>> {
        let mut cumulative = Vec::with_capacity(self.adapters);
        let mut acc = 0.0;
        for p in self.probabilities() {
            acc += p;
            cumulative.push(acc);
        }
        let mut rng = fastrand::Rng::with_seed(sub_seed(self.seed, &[7]));
        (0..n)
            .map(|_| {
                let u = rng.f64();
                cumulative.iter().position(|&c| u < c)
            })
            .collect()
    }

    /// The system prompt of `target` (an adapter, or `None` for the base).
    pub fn system_prompt(&self, target: Option<usize>) -> String {
        let id = target.map_or(0, |a| a as u64 + 1);
        filler_text(
            sub_seed(self.seed, &[8, id]),
            self.system_tokens * self.chars_per_token,
        )
    }

    /// Request `i`'s prompt: its target's `system` prompt, then its question.
    pub fn prompt(&self, system: &str, i: usize) -> String {
        let q = filler_text(
            sub_seed(self.seed, &[9, i as u64]),
            self.question_tokens * self.chars_per_token,
        );
        let mut s = String::with_capacity(system.len() + q.len());
        s.push_str(system);
        s.push_str(&q);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp() -> SharedPrefix {
        SharedPrefix {
            groups: 3,
            prompts_per_group: 4,
            system_tokens: 40,
            question_tokens: 8,
            chars_per_token: 4,
            seed: 42,
            shuffle: false,
        }
    }

    #[test]
    fn deterministic_exact_length_text() {
        let a = filler_text(9, 1000);
        assert_eq!(a.len(), 1000);
        assert!(a.is_ascii());
        assert_eq!(a, filler_text(9, 1000));
        assert_ne!(a, filler_text(10, 1000));
        assert_eq!(filler_text(1, 0), "");
    }

    #[test]
    fn shared_prefix_interleaves_groups() {
        let w = sp();
        let order = w.order();
        assert_eq!(order.len(), 12);
        assert_eq!(&order[..4], &[(0, 0), (1, 0), (2, 0), (0, 1)]);
        assert!(
            order.windows(2).all(|p| p[0].0 != p[1].0),
            "no two in a row share a group"
        );
        let mut sorted = order.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 12, "every prompt exactly once");
        let shuffled = SharedPrefix {
            shuffle: true,
            ..w.clone()
        }
        .order();
        assert_eq!(
            shuffled,
            SharedPrefix { shuffle: true, ..w }.order(),
            "seeded"
        );
        assert_ne!(shuffled, order);
    }

    #[test]
    fn shared_prefix_prompts_share_exactly_the_system_prompt() {
        let w = sp();
        let s0 = w.system_prompt(0);
        let s1 = w.system_prompt(1);
        assert_eq!(s0.len(), 160);
        assert_ne!(s0, s1);
        let a = w.prompt(&s0, 0, 0);
        let b = w.prompt(&s0, 0, 1);
        assert_eq!(a.len(), 192);
        assert!(a.starts_with(&s0) && b.starts_with(&s0));
        assert_ne!(a[160..], b[160..]);
        assert_eq!(a, w.prompt(&w.system_prompt(0), 0, 0), "deterministic");
    }

    #[test]
    fn ideal_hit_rate_formula() {
        // 3 groups x 4 prompts, 40-token system prompts, 16-token blocks:
        // 2 full blocks (32 tokens) shared by the 3 later prompts of each group.
        let want = (3.0 * 3.0 * 32.0) / (12.0 * 48.0);
        assert!((sp().ideal_hit_rate(16) - want).abs() < 1e-12);
        assert_eq!(ideal_shared_prefix_hit_rate(5, 1, 100, 10, 16), 0.0);
        assert_eq!(ideal_shared_prefix_hit_rate(0, 5, 100, 10, 16), 0.0);
        // Sent-order version agrees on a complete run and counts a truncated one.
        let w = sp();
        let full = w.order().into_iter().map(|(g, _)| (g, 48));
        assert!((ideal_hit_rate_of_sent(full, 40, 16) - want).abs() < 1e-12);
        let first_round = w.order().into_iter().take(3).map(|(g, _)| (g, 48));
        assert_eq!(ideal_hit_rate_of_sent(first_round, 40, 16), 0.0);
    }

    #[test]
    fn bounded_ideal_keeps_the_groups_that_fit_and_restarts_miss() {
        let w = sp();
        let sent = || {
            w.order()
                .into_iter()
                .enumerate()
                .map(|(i, (g, _))| (i, g, 48))
        };
        let unbounded = w.ideal_hit_rate(16);
        // Room for every group (2 blocks each): the unbounded ideal.
        let roomy = ideal_hit_rate_bounded(sent(), 40, 16, None, Some((2, 4)));
        assert!((roomy - unbounded).abs() < 1e-12);
        assert!((ideal_hit_rate_bounded(sent(), 40, 16, None, None) - unbounded).abs() < 1e-12);
        // One pod of 5 blocks keeps 2 of the 3 groups: two thirds of the hits.
        let tight = ideal_hit_rate_bounded(sent(), 40, 16, None, Some((1, 5)));
        assert!((tight - unbounded * 2.0 / 3.0).abs() < 1e-12, "{tight}");
        // A restart before request 6 (round 2 of 4): each group's prompt 2
        // misses again, so 2 of 3 repeats per group still hit.
        let restarted = ideal_hit_rate_bounded(sent(), 40, 16, Some(6), None);
        assert!(
            (restarted - unbounded * 2.0 / 3.0).abs() < 1e-12,
            "{restarted}"
        );
        let both = ideal_hit_rate_bounded(sent(), 40, 16, Some(6), Some((1, 2)));
        assert!((both - unbounded * 2.0 / 9.0).abs() < 1e-12, "{both}");
        assert_eq!(
            ideal_hit_rate_bounded(std::iter::empty(), 40, 16, None, None),
            0.0
        );
    }

    #[test]
    fn long_prompts_are_unshared_and_sized() {
        let w = LongPrompt::new(220 * 1024, 1);
        let a = w.prompt(0);
        let b = w.prompt(1);
        assert_eq!(a.len(), 220 * 1024);
        assert_eq!(b.len(), 220 * 1024);
        assert_ne!(a[..64], b[..64], "first block differs");
    }

    fn mix() -> LoraMix {
        LoraMix {
            adapters: 8,
            zipf: 1.0,
            base_share: 0.1,
            system_tokens: 10,
            question_tokens: 5,
            chars_per_token: 4,
            seed: 3,
        }
    }

    #[test]
    fn lora_mix_is_zipf_plus_base() {
        let w = mix();
        let p = w.probabilities();
        assert!((p.iter().sum::<f64>() - 0.9).abs() < 1e-12);
        // Weights 1, 1/2, ... 1/8 (sum 761/280) share 90 %.
        assert!((p[0] - 0.9 * 280.0 / 761.0).abs() < 1e-12);
        assert!((p[0] / p[7] - 8.0).abs() < 1e-9);
        let uniform = LoraMix { zipf: 0.0, ..mix() }.probabilities();
        assert!(uniform.iter().all(|q| (q - 0.9 / 8.0).abs() < 1e-12));
        let order = w.order(20_000);
        assert_eq!(order, w.order(20_000), "seeded");
        let share = |t: Option<usize>| order.iter().filter(|o| **o == t).count() as f64 / 20_000.0;
        assert!((share(None) - 0.1).abs() < 0.01, "{}", share(None));
        for (k, pk) in p.iter().enumerate() {
            assert!(
                (share(Some(k)) - pk).abs() < 0.01,
                "{k}: {}",
                share(Some(k))
            );
        }
        assert_eq!(w.adapter_names()[7], "lora-7");
    }

    #[test]
    fn lora_prompts_share_their_targets_system_prompt() {
        let w = mix();
        let (base, a0) = (w.system_prompt(None), w.system_prompt(Some(0)));
        assert_eq!(base.len(), 40);
        assert_ne!(base, a0);
        assert_ne!(a0, w.system_prompt(Some(1)));
        let p = w.prompt(&a0, 4);
        assert_eq!(p.len(), 60);
        assert!(p.starts_with(&a0));
        assert_ne!(p, w.prompt(&a0, 5));
    }

    #[test]
    fn multi_turn_messages_are_deterministic() {
        let w = MultiTurn {
            sessions: 2,
            turns: 3,
            system_tokens: 10,
            user_tokens: 5,
            chars_per_token: 4,
            seed: 1,
        };
        assert_eq!(w.user_message(1, 2), w.user_message(1, 2));
        assert_ne!(w.user_message(1, 2), w.user_message(1, 1));
        assert_eq!(w.system_prompt(0).len(), 40);
    }
}
