//! The workloads, each producing a [`BenchRun`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Uri;
use serde_json::json;
use tokio::time::Instant;

use super::LoadError;
use super::args::{
    Api, CommonArgs, LongPromptArgs, LoraArgs, MultiTurnArgs, PaceArgs, SeedArgs, SharedPrefixArgs,
    TenantsArgs,
};
use super::client::{HttpClient, Record, RequestSpec, http_client, send};
use super::direct::{DirectSplit, RestartGate, restart_stats, routed_job, split_stats};
use super::records;
use super::result::{BenchRun, PhaseResult, SCHEMA_VERSION};
use super::runner::{
    JobFn, Pace, PhaseMeta, PodSet, cache_delta, drive, lora_delta, scrape_fleet, summarize,
};
use super::tenants::{self, Mix};
use super::workload::{
    LongPrompt, LoraMix, MultiTurn, SharedPrefix, filler_text, ideal_hit_rate_bounded,
    ideal_hit_rate_of_sent, seed_prompt, sub_seed,
};

/// The seed deployment's four scenarios: (name, requests, concurrency).
pub const SEED_SCENARIOS: [(&str, usize, usize); 4] = [
    ("Baseline", 5, 1),
    ("Light load", 20, 5),
    ("Medium load", 50, 10),
    ("Heavy load", 100, 20),
];

/// Everything a workload needs that comes from [`CommonArgs`].
struct Ctx {
    client: HttpClient,
    common: CommonArgs,
    pods: PodSet,
    stream: bool,
    timeout: Duration,
    max_duration: Duration,
}

impl Ctx {
    fn new(common: &CommonArgs, max_conns: usize) -> Result<Self, LoadError> {
        let positive = |v: f64, name: &str| {
            if v.is_finite() && v > 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(LoadError::Args(format!("{name} must be > 0")))
            }
        };
        if common.block_size == 0 || common.chars_per_token == 0 {
            return Err(LoadError::Args(
                "--block-size and --chars-per-token must be >= 1".into(),
            ));
        }
        common
            .target
            .parse::<Uri>()
            .map_err(|e| LoadError::Args(format!("--target {}: {e}", common.target)))?;
        let mut urls = common.pod_metrics.clone();
        if let Some(n) = common.sim_pods {
            for i in 0..n {
                let port = u32::from(common.sim_base_port) + u32::from(i);
                urls.push(format!("http://{}:{port}", common.sim_host));
            }
        }
        Ok(Self {
            client: http_client(max_conns.max(1)),
            common: common.clone(),
            pods: PodSet { urls },
            stream: !common.no_stream,
            timeout: positive(common.request_timeout, "--request-timeout")?,
            max_duration: positive(common.max_duration, "--max-duration")?,
        })
    }

    fn uri(&self, api: Api) -> Result<Uri, LoadError> {
        let path = match api {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        };
        let s = format!("{}{path}", self.common.target.trim_end_matches('/'));
        s.parse()
            .map_err(|e| LoadError::Args(format!("--target {}: {e}", self.common.target)))
    }

    /// Runs one phase: scrape, drive, scrape, summarize.
    async fn phase(
        &self,
        name: String,
        jobs: usize,
        pace: Pace,
        job: JobFn,
        ideal: impl FnOnce(&[Record]) -> Option<f64>,
        with_stickiness: bool,
    ) -> PhaseResult {
        self.phase_with(name, jobs, pace, job, ideal, with_stickiness, |_, _| {})
            .await
    }

    /// [`Ctx::phase`], then `finish` adds what only this workload can tell
    /// from its records.
    #[allow(clippy::too_many_arguments)]
    async fn phase_with(
        &self,
        name: String,
        jobs: usize,
        pace: Pace,
        job: JobFn,
        ideal: impl FnOnce(&[Record]) -> Option<f64>,
        with_stickiness: bool,
        finish: impl FnOnce(&mut PhaseResult, &[Record]),
    ) -> PhaseResult {
        let before = if self.pods.urls.is_empty() {
            None
        } else {
            Some(scrape_fleet(&self.client, &self.pods).await)
        };
        let driven = drive(jobs, pace, self.max_duration, self.common.seed, job).await;
        let (cache, lora) = match before {
            None => (Err("no --pod-metrics or --sim-pods given".to_owned()), None),
            Some(Err(e)) => (Err(e.to_string()), None),
            Some(Ok(b)) => match scrape_fleet(&self.client, &self.pods).await {
                Ok(a) => (Ok(cache_delta(b, a)), lora_delta(b, a)),
                Err(e) => (Err(e.to_string()), None),
            },
        };

        let meta = PhaseMeta {
            name,
            planned_jobs: jobs,
            pace,
            known_pods: self.pods.urls.len(),
            ideal_hit_rate: ideal(&driven.records),
            cache,
            lora,
        };
        if let Some(path) = &self.common.records {
            let label = self.common.label.as_deref().unwrap_or(&self.common.target);
            if let Err(e) = records::append(path, label, &meta.name, &driven.records) {
                eprintln!("note: --records: {}", epp::telemetry::logging::chain(&e));
            }
        }
        let mut result = summarize(meta, &driven, with_stickiness);
        finish(&mut result, &driven.records);
        result
    }

    fn run(
        &self,
        workload: &str,
        command: &str,
        params: serde_json::Value,
        phases: Vec<PhaseResult>,
    ) -> BenchRun {
        BenchRun {
            schema: SCHEMA_VERSION,
            tool: format!("epp-bench {}", env!("CARGO_PKG_VERSION")),
            workload: workload.to_owned(),
            label: self
                .common
                .label
                .clone()
                .unwrap_or_else(|| self.common.target.clone()),
            target: self.common.target.clone(),
            command: command.to_owned(),
            started_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            machine: Some(crate::report::provenance::machine_line()),
            params,
            phases,
        }
    }
}

fn pace_of(p: &PaceArgs, default_concurrency: usize) -> Result<Pace, LoadError> {
    match (p.concurrency, p.rate) {
        (_, Some(rate)) if !(rate.is_finite() && rate > 0.0) => {
            Err(LoadError::Args("--rate must be > 0".into()))
        }
        (_, Some(rate)) => Ok(Pace::Poisson {
            rate,
            max_inflight: p.max_inflight,
        }),
        (Some(0), _) => Err(LoadError::Args("--concurrency must be >= 1".into())),
        (c, None) => Ok(Pace::Closed {
            concurrency: c.unwrap_or(default_concurrency),
        }),
    }
}

fn max_conns(p: &Pace) -> usize {
    match p {
        Pace::Closed { concurrency } => *concurrency,
        Pace::Poisson { max_inflight, .. } => (*max_inflight).min(1024),
    }
}

/// A job that sends one prebuilt-on-demand request, always through the target.
fn single_request_job(
    client: HttpClient,
    timeout: Duration,
    make: Arc<dyn Fn(usize) -> RequestSpec + Send + Sync>,
) -> JobFn {
    routed_job(client, timeout, make, None, None)
}

/// `seed`: the seed deployment's four scenarios of short completions.
pub async fn run_seed(args: &SeedArgs, command: &str) -> Result<BenchRun, LoadError> {
    let ctx = Ctx::new(&args.common, 20)?;
    let uri = ctx.uri(args.api)?;
    let mut phases = Vec::new();
    let mut offset = 0usize;
    for (name, requests, concurrency) in SEED_SCENARIOS {
        let body_ctx = BodyCtx::from(&ctx);
        let bodies: Vec<Bytes> = (0..requests)
            .map(|i| body_ctx.body(args.api, None, &seed_prompt(offset + i), args.max_tokens))
            .collect();
        offset += requests;
        let bodies = Arc::new(bodies);
        let (uri, stream) = (uri.clone(), ctx.stream);
        let make = Arc::new(move |i: usize| RequestSpec {
            uri: uri.clone(),
            body: bodies[i].clone(),
            stream,
            keep_text: false,
            headers: Vec::new(),
        });
        let job = single_request_job(ctx.client.clone(), ctx.timeout, make);
        let pace = Pace::Closed { concurrency };
        phases.push(
            ctx.phase(name.to_owned(), requests, pace, job, |_| None, false)
                .await,
        );
    }
    let params = json!({
        "max_tokens": args.max_tokens,
        "api": format!("{:?}", args.api).to_lowercase(),
        "stream": ctx.stream,
        "scenarios": SEED_SCENARIOS.iter().map(|(n, r, c)| json!({"name": n, "requests": r, "concurrency": c})).collect::<Vec<_>>(),
    });
    Ok(ctx.run("seed", command, params, phases))
}

/// `shared-prefix`: inference-perf's shared_prefix data, interleaved groups.
pub async fn run_shared_prefix(
    args: &SharedPrefixArgs,
    command: &str,
) -> Result<BenchRun, LoadError> {
    if args.question_tokens == 0 {
        return Err(LoadError::Args("--question-tokens must be >= 1".into()));
    }
    let pace = pace_of(&args.pace, 32)?;
    let ctx = Ctx::new(&args.common, max_conns(&pace))?;
    let uri = ctx.uri(args.api)?;
    let w = SharedPrefix {
        groups: args.groups,
        prompts_per_group: args.prompts_per_group,
        system_tokens: args.system_tokens,
        question_tokens: args.question_tokens,
        chars_per_token: args.common.chars_per_token,
        seed: args.common.seed,
        shuffle: args.shuffle,
    };
    let systems: Arc<Vec<String>> = Arc::new((0..w.groups).map(|g| w.system_prompt(g)).collect());
    let order = Arc::new(w.order());
    let split = (args.direct_fraction > 0.0)
        .then(|| {
            DirectSplit::new(
                args.direct_fraction,
                args.common.seed,
                &ctx.pods.urls,
                uri.path(),
            )
        })
        .transpose()?;
    let gate = match (args.restart_pods_at, &args.restarter) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(LoadError::Args(
                "--restart-pods-at needs pods this process runs (epp-bench compare or local)"
                    .into(),
            ));
        }
        (Some(f), Some(r)) => Some(RestartGate::new(
            (f * w.len() as f64).ceil() as usize,
            r.clone(),
        )),
    };
    let cache = args
        .kv_blocks_per_pod
        .map(|blocks| (ctx.pods.urls.len(), blocks));
    let restart_at = gate.as_ref().map(|g| g.at);
    let (bs, sys_tokens, prompt_tokens) = (
        args.common.block_size,
        args.system_tokens,
        args.system_tokens + args.question_tokens,
    );
    let ideal_unbounded = w.ideal_hit_rate(bs);
    let ideal_full = ideal_hit_rate_bounded(
        order
            .iter()
            .enumerate()
            .map(|(i, &(g, _))| (i, g, prompt_tokens)),
        sys_tokens,
        bs,
        restart_at,
        cache,
    );
    let maker = {
        let (w, systems, order) = (w.clone(), Arc::clone(&systems), Arc::clone(&order));
        let (api, stream, out, uri) = (args.api, ctx.stream, args.output_tokens, uri.clone());
        let body_ctx = BodyCtx::from(&ctx);
        move |i: usize| {
            let (g, p) = order[i];
            let body = match api {
                Api::Completions => body_ctx.body(api, None, &w.prompt(&systems[g], g, p), out),
                Api::Chat => {
                    let full = w.prompt("", g, p);
                    body_ctx.body(api, Some(&systems[g]), &full, out)
                }
            };
            RequestSpec {
                uri: uri.clone(),
                body,
                stream,
                keep_text: false,
                headers: Vec::new(),
            }
        }
    };
    let job = routed_job(
        ctx.client.clone(),
        ctx.timeout,
        Arc::new(maker),
        split.clone(),
        gate.clone(),
    );
    let (order_for_ideal, order_for_groups) = (Arc::clone(&order), Arc::clone(&order));
    let total = w.len();
    let phase = ctx
        .phase_with(
            "shared-prefix".to_owned(),
            total,
            pace,
            job,
            move |records| {
                if records.len() == total {
                    return Some(ideal_full);
                }
                let mut sent: Vec<_> = records.iter().map(|r| r.job).collect();
                sent.sort_unstable();
                Some(ideal_hit_rate_bounded(
                    sent.into_iter()
                        .map(|j| (j, order_for_ideal[j].0, prompt_tokens)),
                    sys_tokens,
                    bs,
                    restart_at,
                    cache,
                ))
            },
            false,
            move |result, records| {
                result.split = split.as_ref().map(|s| split_stats(s, records));
                result.restart = gate
                    .as_ref()
                    .map(|g| restart_stats(g, records, |j| order_for_groups[j].0));
            },
        )
        .await;
    let params = json!({
        "groups": args.groups,
        "prompts_per_group": args.prompts_per_group,
        "system_tokens": args.system_tokens,
        "question_tokens": args.question_tokens,
        "output_tokens": args.output_tokens,
        "shuffle": args.shuffle,
        "api": format!("{:?}", args.api).to_lowercase(),
        "concurrency": args.pace.concurrency,
        "rate": args.pace.rate,
        "block_size": args.common.block_size,
        "ideal_hit_rate": ideal_full,
        "ideal_hit_rate_unbounded": ideal_unbounded,
        "kv_blocks_per_pod": args.kv_blocks_per_pod,
        "direct_fraction": args.direct_fraction,
        "restart_pods_at": args.restart_pods_at,
        "restart_at_request": restart_at,
        "stream": ctx.stream,
    });
    Ok(ctx.run("shared-prefix", command, params, vec![phase]))
}

/// `long-prompt`: unshared long prompts up a concurrency ladder.
pub async fn run_long_prompt(args: &LongPromptArgs, command: &str) -> Result<BenchRun, LoadError> {
    if args.ladder.is_empty() || args.ladder.contains(&0) {
        return Err(LoadError::Args("--ladder needs concurrencies >= 1".into()));
    }
    let max_c = args.ladder.iter().copied().max().unwrap_or(1);
    let ctx = Ctx::new(&args.common, max_c)?;
    let uri = ctx.uri(args.api)?;
    let w = Arc::new(LongPrompt::new(args.prompt_kb * 1024, args.common.seed));
    let mut phases = Vec::new();
    for (step, &concurrency) in args.ladder.iter().enumerate() {
        let offset = step * args.requests_per_step;
        let maker = {
            let (w, uri, api, out, stream) = (
                Arc::clone(&w),
                uri.clone(),
                args.api,
                args.output_tokens,
                ctx.stream,
            );
            let body_ctx = BodyCtx::from(&ctx);
            move |i: usize| RequestSpec {
                uri: uri.clone(),
                body: body_ctx.body(api, None, &w.prompt(offset + i), out),
                stream,
                keep_text: false,
                headers: Vec::new(),
            }
        };
        let job = single_request_job(ctx.client.clone(), ctx.timeout, Arc::new(maker));
        let pace = Pace::Closed { concurrency };
        phases.push(
            ctx.phase(
                format!("c={concurrency}"),
                args.requests_per_step,
                pace,
                job,
                |_| Some(0.0),
                false,
            )
            .await,
        );
    }
    let params = json!({
        "prompt_kb": args.prompt_kb,
        "prompt_bytes": w.bytes(),
        "ladder": args.ladder,
        "requests_per_step": args.requests_per_step,
        "output_tokens": args.output_tokens,
        "api": format!("{:?}", args.api).to_lowercase(),
        "stream": ctx.stream,
    });
    Ok(ctx.run("long-prompt", command, params, phases))
}

/// `multi-turn`: sessions whose every turn resends the whole conversation.
pub async fn run_multi_turn(args: &MultiTurnArgs, command: &str) -> Result<BenchRun, LoadError> {
    if args.turns == 0 {
        return Err(LoadError::Args("--turns must be >= 1".into()));
    }
    let pace = pace_of(&args.pace, 16)?;
    let ctx = Ctx::new(&args.common, max_conns(&pace))?;
    let uri = ctx.uri(Api::Chat)?;
    let w = Arc::new(MultiTurn {
        sessions: args.sessions,
        turns: args.turns,
        system_tokens: args.system_tokens,
        user_tokens: args.user_tokens,
        chars_per_token: args.common.chars_per_token,
        seed: args.common.seed,
    });
    let job: JobFn = {
        let (client, timeout, body_ctx) = (ctx.client.clone(), ctx.timeout, BodyCtx::from(&ctx));
        let (turns, out, think) = (
            args.turns,
            args.output_tokens,
            Duration::from_millis(args.think_time_ms),
        );
        Arc::new(move |session, deadline| {
            let (client, body_ctx, w, uri) = (
                client.clone(),
                body_ctx.clone(),
                Arc::clone(&w),
                uri.clone(),
            );
            Box::pin(async move {
                let mut records = Vec::with_capacity(turns);
                let mut messages =
                    vec![json!({"role": "system", "content": w.system_prompt(session)})];
                for turn in 0..turns {
                    if turn > 0 {
                        if !think.is_zero() {
                            tokio::time::sleep(think).await;
                        }
                        if Instant::now() >= deadline {
                            break;
                        }
                    }
                    messages
                        .push(json!({"role": "user", "content": w.user_message(session, turn)}));
                    let mut v = json!({"model": body_ctx.model, "messages": messages});
                    body_ctx.finish_body(&mut v, out);
                    let spec = RequestSpec {
                        uri: uri.clone(),
                        body: Bytes::from(v.to_string()),
                        stream: body_ctx.stream,
                        keep_text: true,
                        headers: Vec::new(),
                    };
                    let start = Instant::now();
                    let (pod, outcome) = send(&client, &spec, timeout).await;
                    let reply = outcome.as_ref().ok().map(|s| s.text.clone());
                    records.push(Record {
                        job: session,
                        turn,
                        start,
                        pod,
                        direct: false,
                        outcome: outcome.map(|mut s| {
                            s.text = String::new();
                            s
                        }),
                    });
                    match reply {
                        Some(text) => messages.push(json!({"role": "assistant", "content": text})),
                        // A failed turn ends the conversation, as a user would.
                        None => break,
                    }
                }
                records
            })
        })
    };
    let phase = ctx
        .phase(
            "multi-turn".to_owned(),
            args.sessions,
            pace,
            job,
            |_| None,
            true,
        )
        .await;
    let params = json!({
        "sessions": args.sessions,
        "turns": args.turns,
        "system_tokens": args.system_tokens,
        "user_tokens": args.user_tokens,
        "output_tokens": args.output_tokens,
        "think_time_ms": args.think_time_ms,
        "concurrency": args.pace.concurrency,
        "rate": args.pace.rate,
        "stream": ctx.stream,
    });
    Ok(ctx.run("multi-turn", command, params, vec![phase]))
}

/// `lora`: requests over LoRA adapters with Zipf popularity and some
/// base-model traffic; each target has its own system prompt.
pub async fn run_lora(args: &LoraArgs, command: &str) -> Result<BenchRun, LoadError> {
    if args.question_tokens == 0 {
        return Err(LoadError::Args("--question-tokens must be >= 1".into()));
    }
    if !(0.0..=1.0).contains(&args.base_share) || (args.adapters == 0 && args.base_share < 1.0) {
        return Err(LoadError::Args(
            "--base-share must be within 0..=1 (and 1 without adapters)".into(),
        ));
    }
    if !(args.zipf.is_finite() && args.zipf >= 0.0) {
        return Err(LoadError::Args("--zipf must be >= 0".into()));
    }
    let pace = pace_of(&args.pace, 32)?;
    let ctx = Ctx::new(&args.common, max_conns(&pace))?;
    let uri = ctx.uri(args.api)?;
    let w = LoraMix {
        adapters: args.adapters,
        zipf: args.zipf,
        base_share: args.base_share,
        system_tokens: args.system_tokens,
        question_tokens: args.question_tokens,
        chars_per_token: args.common.chars_per_token,
        seed: args.common.seed,
    };
    let order = Arc::new(w.order(args.requests));
    // Index 0 is the base model, adapter k is k + 1.
    let slot = |t: Option<usize>| t.map_or(0, |a| a + 1);
    let systems: Arc<Vec<String>> = Arc::new(
        std::iter::once(None)
            .chain((0..w.adapters).map(Some))
            .map(|t| w.system_prompt(t))
            .collect(),
    );
    let names: Arc<Vec<String>> = Arc::new(
        std::iter::once(args.common.model.clone())
            .chain(w.adapter_names())
            .collect(),
    );
    let maker = {
        let (w, systems, order, names) = (
            w.clone(),
            Arc::clone(&systems),
            Arc::clone(&order),
            Arc::clone(&names),
        );
        let (api, stream, out, uri) = (args.api, ctx.stream, args.output_tokens, uri.clone());
        let body_ctx = BodyCtx::from(&ctx);
        move |i: usize| {
            let t = slot(order[i]);
            let body_ctx = BodyCtx {
                model: names[t].clone(),
                ..body_ctx.clone()
            };
            let body = match api {
                Api::Completions => body_ctx.body(api, None, &w.prompt(&systems[t], i), out),
                Api::Chat => body_ctx.body(api, Some(&systems[t]), &w.prompt("", i), out),
            };
            RequestSpec {
                uri: uri.clone(),
                body,
                stream,
                keep_text: false,
                headers: Vec::new(),
            }
        }
    };
    let job = single_request_job(ctx.client.clone(), ctx.timeout, Arc::new(maker));
    let (bs, sys_tokens, prompt_tokens) = (
        args.common.block_size,
        args.system_tokens,
        args.system_tokens + args.question_tokens,
    );
    let (order_for_ideal, order_for_pods) = (Arc::clone(&order), Arc::clone(&order));
    let phase = ctx
        .phase_with(
            "lora".to_owned(),
            args.requests,
            pace,
            job,
            // Every repeat of a target's system prompt a hit (adapters share
            // no blocks with each other or the base model).
            move |records| {
                let mut sent: Vec<_> = records.iter().map(|r| r.job).collect();
                sent.sort_unstable();
                Some(ideal_hit_rate_of_sent(
                    sent.into_iter()
                        .map(|j| (slot(order_for_ideal[j]), prompt_tokens)),
                    sys_tokens,
                    bs,
                ))
            },
            false,
            move |result, records| {
                let mut by_target: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
                for r in records {
                    if let (Ok(_), Some(pod)) = (&r.outcome, &r.pod) {
                        let target = &names[slot(order_for_pods[r.job])];
                        *by_target
                            .entry(target.clone())
                            .or_default()
                            .entry(pod.clone())
                            .or_default() += 1;
                    }
                }
                result.target_pods = Some(by_target);
            },
        )
        .await;
    let mix: Vec<_> = w
        .probabilities()
        .iter()
        .enumerate()
        .map(|(k, p)| json!({"adapter": LoraMix::adapter_name(k), "share": p}))
        .collect();
    let params = json!({
        "requests": args.requests,
        "adapters": args.adapters,
        "zipf": args.zipf,
        "base_share": args.base_share,
        "adapter_shares": mix,
        "system_tokens": args.system_tokens,
        "question_tokens": args.question_tokens,
        "output_tokens": args.output_tokens,
        "api": format!("{:?}", args.api).to_lowercase(),
        "concurrency": args.pace.concurrency,
        "rate": args.pace.rate,
        "stream": ctx.stream,
    });
    Ok(ctx.run("lora", command, params, vec![phase]))
}

/// `tenants`: tenants at their own Poisson rates, each request tagged with
/// its fairness id and a critical or standard objective (see
/// [`tenants`](super::tenants)).
pub async fn run_tenants(args: &TenantsArgs, command: &str) -> Result<BenchRun, LoadError> {
    if args.prompt_tokens == 0 {
        return Err(LoadError::Args("--prompt-tokens must be >= 1".into()));
    }
    if !(args.duration.is_finite() && args.duration > 0.0) {
        return Err(LoadError::Args("--duration must be > 0".into()));
    }
    let mix = Arc::new(Mix::parse(
        &args.tenants,
        args.critical_share,
        args.common.seed,
    )?);
    let header = |v: &str, what: &str| {
        http::HeaderValue::from_str(v).map_err(|e| LoadError::Args(format!("{what} {v:?}: {e}")))
    };
    let fairness: Vec<http::HeaderValue> = mix
        .tenants
        .iter()
        .map(|(n, _)| header(n, "--tenants"))
        .collect::<Result<_, _>>()?;
    let objectives = [
        header(&args.standard_objective, "--standard-objective")?,
        header(&args.critical_objective, "--critical-objective")?,
    ];
    let slo = args
        .slo_ttft_ms
        .map(|ms| header(&ms.to_string(), "--slo-ttft-ms"))
        .transpose()?;
    let total_rate = mix.total_rate();
    let jobs = (total_rate * args.duration).round().max(1.0) as usize;
    let pace = Pace::Poisson {
        rate: total_rate,
        max_inflight: args.max_inflight,
    };
    let ctx = Ctx::new(&args.common, max_conns(&pace))?;
    let uri = ctx.uri(args.api)?;
    let maker = {
        let (mix, uri, api, out, stream, seed) = (
            Arc::clone(&mix),
            uri.clone(),
            args.api,
            args.output_tokens,
            ctx.stream,
            args.common.seed,
        );
        let bytes = args.prompt_tokens * args.common.chars_per_token;
        let body_ctx = BodyCtx::from(&ctx);
        move |i: usize| {
            let (tenant, critical) = mix.class(i);
            let prompt = filler_text(sub_seed(seed, &[8, i as u64]), bytes);
            let mut headers = vec![
                (
                    http::HeaderName::from_static("x-gateway-inference-fairness-id"),
                    fairness[tenant].clone(),
                ),
                (
                    http::HeaderName::from_static("x-gateway-inference-objective"),
                    objectives[usize::from(critical)].clone(),
                ),
            ];
            if let Some(v) = &slo {
                headers.push((http::HeaderName::from_static("x-slo-ttft-ms"), v.clone()));
            }
            RequestSpec {
                uri: uri.clone(),
                body: body_ctx.body(api, None, &prompt, out),
                stream,
                keep_text: false,
                headers,
            }
        }
    };
    let job = single_request_job(ctx.client.clone(), ctx.timeout, Arc::new(maker));
    let mix_for_stats = Arc::clone(&mix);
    let (standard, critical, slo_ms, window) = (
        args.standard_objective.clone(),
        args.critical_objective.clone(),
        args.slo_ttft_ms,
        args.duration,
    );
    let phase = ctx
        .phase_with(
            "tenants".to_owned(),
            jobs,
            pace,
            job,
            |_| None,
            false,
            move |result, records| {
                result.tenants = Some(tenants::stats(
                    &mix_for_stats,
                    (&standard, &critical),
                    slo_ms,
                    records,
                    window,
                ));
            },
        )
        .await;
    let params = json!({
        "tenants": mix.tenants.iter().map(|(n, r)| json!({"name": n, "rate": r})).collect::<Vec<_>>(),
        "duration_s": args.duration,
        "critical_share": args.critical_share,
        "critical_objective": args.critical_objective,
        "standard_objective": args.standard_objective,
        "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens,
        "slo_ttft_ms": args.slo_ttft_ms,
        "request_timeout_s": args.common.request_timeout,
        "api": format!("{:?}", args.api).to_lowercase(),
        "stream": ctx.stream,
    });
    Ok(ctx.run("tenants", command, params, vec![phase]))
}

/// The part of [`Ctx`] request builders need, cheap to clone into closures.
#[derive(Clone)]
struct BodyCtx {
    model: String,
    stream: bool,
}

impl From<&Ctx> for BodyCtx {
    fn from(c: &Ctx) -> Self {
        Self {
            model: c.common.model.clone(),
            stream: c.stream,
        }
    }
}

impl BodyCtx {
    fn finish_body(&self, v: &mut serde_json::Value, max_tokens: usize) {
        v["max_tokens"] = json!(max_tokens);
        v["temperature"] = json!(0);
        v["ignore_eos"] = json!(true);
        v["stream"] = json!(self.stream);
        if self.stream {
            v["stream_options"] = json!({"include_usage": true});
        }
    }

    fn body(&self, api: Api, system: Option<&str>, prompt: &str, max_tokens: usize) -> Bytes {
        let mut v = match api {
            Api::Completions => json!({ "model": self.model, "prompt": prompt }),
            Api::Chat => {
                let mut messages = Vec::with_capacity(2);
                if let Some(s) = system {
                    messages.push(json!({"role": "system", "content": s}));
                }
                messages.push(json!({"role": "user", "content": prompt}));
                json!({ "model": self.model, "messages": messages })
            }
        };
        self.finish_body(&mut v, max_tokens);
        Bytes::from(v.to_string())
    }
}
