//! The workload subcommands (`seed`, `shared-prefix`, `long-prompt`,
//! `multi-turn`, `lora`): run a workload against `--target`, print its tables and
//! notes, and with `--json` save the result for `epp-bench report`.

use super::{
    BenchRun, LoadError,
    args::{
        CommonArgs, LongPromptArgs, LoraArgs, MultiTurnArgs, SeedArgs, SharedPrefixArgs,
        TenantsArgs,
    },
    run_long_prompt, run_lora, run_multi_turn, run_seed, run_shared_prefix, run_tenants,
};
use crate::report;

/// Prints the seed deployment's table before the summary, for comparison
/// with the numbers.
pub async fn seed(a: &SeedArgs, command: &str) -> Result<(), LoadError> {
    let run = run_seed(a, command).await?;
    println!("{}", report::seed_table(&run));
    finish(&run, &a.common)
}

/// Prints the workload's ideal hit rate before the measured one.
pub async fn shared_prefix(a: &SharedPrefixArgs, command: &str) -> Result<(), LoadError> {
    let run = run_shared_prefix(a, command).await?;
    if let Some(i) = run.phases.first().and_then(|p| p.ideal_hit_rate) {
        println!(
            "ideal prefix-cache hit rate of this workload: {:.1}%",
            i * 100.0
        );
    }
    finish(&run, &a.common)
}

pub async fn long_prompt(a: &LongPromptArgs, command: &str) -> Result<(), LoadError> {
    let run = run_long_prompt(a, command).await?;
    finish(&run, &a.common)
}

pub async fn multi_turn(a: &MultiTurnArgs, command: &str) -> Result<(), LoadError> {
    let run = run_multi_turn(a, command).await?;
    finish(&run, &a.common)
}

/// Prints the adapter loads per 1,000 requests and where each target went.
pub async fn lora(a: &LoraArgs, command: &str) -> Result<(), LoadError> {
    let run = run_lora(a, command).await?;
    for p in &run.phases {
        match &p.lora {
            Some(l) => println!(
                "adapter loads: {} ({:.1} per 1,000 requests), evictions: {}",
                l.loads, l.loads_per_1k_requests, l.evictions
            ),
            None => eprintln!(
                "note: {}: no adapter loads: the pods do not export vllm-sim's LoRA counters",
                p.name
            ),
        }
        if let Some(t) = report::target_pods_table(p) {
            println!("{t}");
        }
    }
    finish(&run, &a.common)
}

/// Prints the per-tenant and per-class table.
pub async fn tenants(a: &TenantsArgs, command: &str) -> Result<(), LoadError> {
    let run = run_tenants(a, command).await?;
    if let Some(t) = report::tenants_table(&[(run.label.clone(), run.clone())]) {
        println!("{t}");
    }
    finish(&run, &a.common)
}

/// The summary every workload ends with: the phase table, why a phase has
/// no hit rate or stopped early, requests per pod; then the `--json` file.
fn finish(run: &BenchRun, common: &CommonArgs) -> Result<(), LoadError> {
    println!("\n{} ({}):\n", run.workload, run.label);
    print!("{}", report::phase_table(run));
    for p in &run.phases {
        if let Some(e) = &p.prefix_cache_error {
            eprintln!("note: {}: no hit rate: {e}", p.name);
        }
        if p.hit_max_duration {
            eprintln!("note: {}: stopped by --max-duration", p.name);
        }
        if let Some(counts) = report::pod_requests(p) {
            println!("{} per-pod requests: {counts}", p.name);
        }
    }
    if let Some(path) = &common.json {
        let text = serde_json::to_string_pretty(run).map_err(LoadError::Serialize)?;
        std::fs::write(path, text).map_err(|source| LoadError::Write {
            path: path.clone(),
            source,
        })?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
