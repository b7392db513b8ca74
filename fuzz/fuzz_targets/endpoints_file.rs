//! The two files an operator (or whoever can write a ConfigMap) hands the
//! picker: the endpoints file and the EndpointPickerConfig.
//!
//! Input: the file text (UTF-8 only; both loaders read text). Checks, beyond
//! "no panic": an accepted endpoints file has unique names and non-zero
//! ports, and publishing it into a store makes every endpoint findable by its
//! `ip:port`; an accepted config either builds a scheduler and scrape
//! settings or is refused with an error.
#![no_main]

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use epp::{
    config::EndpointPickerConfig,
    discovery::parse_endpoints,
    endpoints::EndpointStore,
    prefix::PrefixIndex,
    scheduling::{SchedulerOptions, build_scheduler},
    scrape::ScrapeSettings,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_endpoints(text);
    check_config(text);
});

fn check_endpoints(text: &str) {
    let Ok(specs) = parse_endpoints(text) else {
        return;
    };
    let mut names = HashSet::new();
    for s in &specs {
        assert!(names.insert(s.name.clone()), "duplicate name {:?}", s.name);
        assert_ne!(s.port, 0);
        assert_ne!(s.metrics_port, Some(0));
    }
    let store = EndpointStore::new(Duration::from_secs(2));
    if store.replace(specs.clone()).is_err() {
        return;
    }
    let snap = store.snapshot();
    for s in &specs {
        assert!(
            snap.get(&s.host_port()).is_some(),
            "{} not in the store",
            s.host_port()
        );
    }
}

fn check_config(text: &str) {
    let Ok(cfg) = EndpointPickerConfig::parse(text) else {
        return;
    };
    let _ = cfg.flow_control_requested();
    let opts = SchedulerOptions {
        fallback_endpoints: 2,
        max_scrape_failures: 3,
        staleness: Duration::from_secs(2),
        epoch: Instant::now(),
    };
    let _ = build_scheduler(&cfg, &opts, Arc::new(PrefixIndex::new()));
    let _ = ScrapeSettings::from_config(&cfg, None, None, None);
}
