//! Server metrics in the Prometheus text format: counters, gauges and latency histograms.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Cumulative-bucket histogram of seconds (or any non-negative value).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramState>,
}

#[derive(Debug, Default)]
struct HistogramState {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with these bucket upper bounds, ascending (`+Inf` is implied).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            inner: Mutex::new(HistogramState {
                counts: vec![0; bounds.len()],
                ..Default::default()
            }),
        }
    }

    /// Records one value.
    pub fn observe(&self, value: f64) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (count, &bound) in s.counts.iter_mut().zip(self.bounds) {
            if value <= bound {
                *count += 1;
            }
        }
        s.sum += value;
        s.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (count, bound) in s.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", s.sum, s.count);
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Everything `/metrics` reports. Counters only grow; gauges are set by the engine.
#[derive(Debug)]
pub struct Metrics {
    /// Requests answered in full.
    pub requests_ok: AtomicU64,
    /// Requests refused as invalid (HTTP 4xx).
    pub requests_client_error: AtomicU64,
    /// Requests refused with 503: queue full or shutting down.
    pub requests_rejected_busy: AtomicU64,
    /// Requests whose client went away before the end.
    pub requests_cancelled: AtomicU64,
    /// Requests whose generation failed in the engine.
    pub requests_failed: AtomicU64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Gauge: requests waiting for a decoding slot.
    pub queue_depth: AtomicU64,
    /// Gauge: sequences holding a slot (prefilling or decoding).
    pub active_sequences: AtomicU64,
    /// Gauge: sequences whose prompt is still being prefilled.
    pub prefilling_sequences: AtomicU64,
    /// Prompt pieces prefilled (chunked prefill).
    pub prefill_pieces: AtomicU64,
    /// Prompt tokens of requests that looked for a cached prefix (vLLM's
    /// `prefix_cache_queries`).
    pub prefix_cache_queries: AtomicU64,
    /// Of those, the tokens a cached prefix served (vLLM's `prefix_cache_hits`).
    pub prefix_cache_hits: AtomicU64,
    /// Gauge: positions held in the slots' KV caches.
    pub kv_cache_tokens: AtomicU64,
    /// Gauge: positions the slots' KV caches can hold (slots times the context).
    pub kv_cache_capacity: AtomicU64,
    /// Speculative steps that drafted (vLLM's `spec_decode_num_drafts`).
    pub drafts: AtomicU64,
    /// Steps in which speculation was switched off because the batch was too large.
    pub speculation_disabled_steps: AtomicU64,
    /// Draft tokens proposed by speculative decoding.
    pub draft_proposed: AtomicU64,
    /// Draft tokens the target accepted.
    pub draft_accepted: AtomicU64,
    /// Tokens decoded with per-token early exit.
    pub early_exit_tokens: AtomicU64,
    /// Layers those tokens ran, summed.
    pub early_exit_layers: AtomicU64,
    /// Seconds from request arrival to the first generated token.
    pub ttft: Histogram,
    /// Mean seconds between generated tokens, one value per request.
    pub time_per_output_token: Histogram,
    /// Seconds from request arrival to its last token.
    pub request_duration: Histogram,
    /// Seconds from request arrival to the start of its prefill.
    pub queue_wait: Histogram,
    /// Sequences advanced by each batched decoding step.
    pub batch_size: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests_ok: AtomicU64::new(0),
            requests_client_error: AtomicU64::new(0),
            requests_rejected_busy: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            active_sequences: AtomicU64::new(0),
            prefilling_sequences: AtomicU64::new(0),
            prefill_pieces: AtomicU64::new(0),
            prefix_cache_queries: AtomicU64::new(0),
            prefix_cache_hits: AtomicU64::new(0),
            kv_cache_tokens: AtomicU64::new(0),
            kv_cache_capacity: AtomicU64::new(0),
            drafts: AtomicU64::new(0),
            speculation_disabled_steps: AtomicU64::new(0),
            draft_proposed: AtomicU64::new(0),
            draft_accepted: AtomicU64::new(0),
            early_exit_tokens: AtomicU64::new(0),
            early_exit_layers: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY_BOUNDS),
            time_per_output_token: Histogram::new(LATENCY_BOUNDS),
            request_duration: Histogram::new(LATENCY_BOUNDS),
            queue_wait: Histogram::new(LATENCY_BOUNDS),
            batch_size: Histogram::new(BATCH_BOUNDS),
        }
    }
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP dynexec_requests_total Finished requests by outcome.\n# TYPE dynexec_requests_total counter"
        );
        for (outcome, counter) in [
            ("ok", &self.requests_ok),
            ("client_error", &self.requests_client_error),
            ("rejected_busy", &self.requests_rejected_busy),
            ("cancelled", &self.requests_cancelled),
            ("failed", &self.requests_failed),
        ] {
            let _ = writeln!(
                out,
                "dynexec_requests_total{{outcome=\"{outcome}\"}} {}",
                get(counter)
            );
        }
        let mut scalar = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        scalar(
            "dynexec_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            get(&self.prompt_tokens).to_string(),
        );
        scalar(
            "dynexec_generated_tokens_total",
            "counter",
            "Tokens generated.",
            get(&self.generated_tokens).to_string(),
        );
        scalar(
            "dynexec_queue_depth",
            "gauge",
            "Requests waiting for a decoding slot.",
            get(&self.queue_depth).to_string(),
        );
        scalar(
            "dynexec_active_sequences",
            "gauge",
            "Sequences holding a slot, prefilling or decoding.",
            get(&self.active_sequences).to_string(),
        );
        scalar(
            "dynexec_prefilling_sequences",
            "gauge",
            "Sequences whose prompt is still being prefilled.",
            get(&self.prefilling_sequences).to_string(),
        );
        let (cached, capacity) = (get(&self.kv_cache_tokens), get(&self.kv_cache_capacity));
        scalar(
            "dynexec_kv_cache_tokens",
            "gauge",
            "Positions held in the slots' KV caches.",
            cached.to_string(),
        );
        scalar(
            "dynexec_kv_cache_usage_ratio",
            "gauge",
            "KV-cache positions held over what the slots can hold, 0 to 1 (vLLM: kv_cache_usage_perc).",
            (cached as f64 / capacity.max(1) as f64).to_string(),
        );
        scalar(
            "dynexec_prefill_pieces_total",
            "counter",
            "Prompt pieces prefilled (a prompt longer than a step's token budget takes several).",
            get(&self.prefill_pieces).to_string(),
        );
        scalar(
            "dynexec_prefix_cache_queries_total",
            "counter",
            "Prompt tokens of requests that looked for a cached prefix (vLLM: prefix_cache_queries).",
            get(&self.prefix_cache_queries).to_string(),
        );
        scalar(
            "dynexec_prefix_cache_hits_total",
            "counter",
            "Prompt tokens served from a cached prefix instead of prefilled (vLLM: prefix_cache_hits).",
            get(&self.prefix_cache_hits).to_string(),
        );
        scalar(
            "dynexec_drafts_total",
            "counter",
            "Speculative steps that drafted (vLLM: spec_decode_num_drafts).",
            get(&self.drafts).to_string(),
        );
        scalar(
            "dynexec_speculation_disabled_steps_total",
            "counter",
            "Decoding steps in which speculation was off because more sequences were active than --spec-max-batch.",
            get(&self.speculation_disabled_steps).to_string(),
        );
        let (proposed, accepted) = (get(&self.draft_proposed), get(&self.draft_accepted));
        scalar(
            "dynexec_draft_tokens_proposed_total",
            "counter",
            "Draft tokens proposed by speculative decoding (vLLM: spec_decode_num_draft_tokens).",
            proposed.to_string(),
        );
        scalar(
            "dynexec_draft_tokens_accepted_total",
            "counter",
            "Draft tokens the target accepted (vLLM: spec_decode_num_accepted_tokens).",
            accepted.to_string(),
        );
        let rate = if proposed == 0 {
            0.0
        } else {
            accepted as f64 / proposed as f64
        };
        scalar(
            "dynexec_acceptance_rate",
            "gauge",
            "Accepted over proposed draft tokens since start.",
            rate.to_string(),
        );
        scalar(
            "dynexec_early_exit_tokens_total",
            "counter",
            "Tokens decoded with per-token early exit.",
            get(&self.early_exit_tokens).to_string(),
        );
        scalar(
            "dynexec_early_exit_layers_total",
            "counter",
            "Layers those tokens ran (divide by the tokens for the mean exit layer).",
            get(&self.early_exit_layers).to_string(),
        );
        self.ttft.render(
            &mut out,
            "dynexec_time_to_first_token_seconds",
            "From request arrival to the first generated token.",
        );
        self.time_per_output_token.render(
            &mut out,
            "dynexec_time_per_output_token_seconds",
            "Mean time between generated tokens, per request.",
        );
        self.request_duration.render(
            &mut out,
            "dynexec_request_duration_seconds",
            "From request arrival to its last token.",
        );
        self.queue_wait.render(
            &mut out,
            "dynexec_queue_wait_seconds",
            "From request arrival to the start of its prefill.",
        );
        self.batch_size.render(
            &mut out,
            "dynexec_batch_size",
            "Sequences advanced by each batched decoding step.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_the_text_is_prometheus_format() {
        let m = Metrics::default();
        m.ttft.observe(0.02);
        m.ttft.observe(3.0);
        add(&m.requests_ok, 2);
        add(&m.draft_proposed, 4);
        add(&m.draft_accepted, 3);
        let text = m.render();
        assert!(
            text.contains("dynexec_requests_total{outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(text.contains("dynexec_time_to_first_token_seconds_bucket{le=\"0.01\"} 0"));
        assert!(text.contains("dynexec_time_to_first_token_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("dynexec_time_to_first_token_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("dynexec_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("dynexec_time_to_first_token_seconds_count 2"));
        assert!(text.contains("dynexec_acceptance_rate 0.75"));
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect(line);
            assert!(!name.is_empty() && value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
