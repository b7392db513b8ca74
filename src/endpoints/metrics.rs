//! Scraped model-server signals of one endpoint, kept in atomics so the
//! scraper can publish and the request path can read without a lock or an
//! allocation. Fields are updated one by one; a reader may see a mix of two
//! consecutive scrapes, which is harmless for scoring (each value is itself a
//! valid recent observation).

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// The values one scrape produced.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricsSample {
    pub waiting: u32,
    pub running: u32,
    /// Fraction 0..1 of the KV cache in use.
    pub kv_usage: f64,
    /// Tokens per KV block; 0 when not reported.
    pub block_size: u32,
    /// KV blocks of the whole cache; 0 when not reported.
    pub num_blocks: u32,
}

#[derive(Debug, Default)]
pub struct EndpointMetrics {
    waiting: AtomicU32,
    running: AtomicU32,
    kv_usage_bits: AtomicU64,
    block_size: AtomicU32,
    num_blocks: AtomicU32,
    /// Nanoseconds after the store epoch of the last good scrape, plus one so
    /// that zero means "never".
    updated_at: AtomicU64,
    consecutive_failures: AtomicU32,
}

impl EndpointMetrics {
    pub(super) fn store(&self, s: &MetricsSample, at: Instant, epoch: Instant) {
        self.waiting.store(s.waiting, Ordering::Relaxed);
        self.running.store(s.running, Ordering::Relaxed);
        self.kv_usage_bits
            .store(s.kv_usage.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
        self.block_size.store(s.block_size, Ordering::Relaxed);
        self.num_blocks.store(s.num_blocks, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let nanos =
            u64::try_from(at.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX - 1);
        self.updated_at.store(nanos + 1, Ordering::Release);
    }

    /// Counts a failed scrape; returns the new run length.
    pub fn record_failure(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// The latest values, or `None` before the first successful scrape.
    pub fn sample(&self) -> Option<MetricsSample> {
        if self.updated_at.load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(self.sample_or_default())
    }

    /// The latest values, zero before the first scrape (what scorers assume
    /// of an endpoint they know nothing about yet).
    pub fn sample_or_default(&self) -> MetricsSample {
        MetricsSample {
            waiting: self.waiting.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            kv_usage: f64::from_bits(self.kv_usage_bits.load(Ordering::Relaxed)),
            block_size: self.block_size.load(Ordering::Relaxed),
            num_blocks: self.num_blocks.load(Ordering::Relaxed),
        }
    }

    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn running(&self) -> u32 {
        self.running.load(Ordering::Relaxed)
    }

    pub fn kv_usage(&self) -> f64 {
        f64::from_bits(self.kv_usage_bits.load(Ordering::Relaxed))
    }

    pub fn block_size(&self) -> u32 {
        self.block_size.load(Ordering::Relaxed)
    }

    pub fn num_blocks(&self) -> u32 {
        self.num_blocks.load(Ordering::Relaxed)
    }

    /// Time since the last good scrape, `None` if there never was one.
    pub fn age(&self, now: Instant, epoch: Instant) -> Option<Duration> {
        let stamp = self.updated_at.load(Ordering::Acquire);
        if stamp == 0 {
            return None;
        }
        let at = epoch + Duration::from_nanos(stamp - 1);
        Some(now.saturating_duration_since(at))
    }
}
