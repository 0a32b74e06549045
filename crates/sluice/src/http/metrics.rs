//! Prometheus metrics of the watched queries, fed by their progress records.
//!
//! Every progress record updates the families below as its batch completes
//! (through a [`sluice_exec::ProgressListener`]), so counters count every
//! batch, however rarely they are scraped. The text is encoded by the
//! `prometheus-client` crate: in Prometheus's text format (0.0.4) by
//! default, or in the OpenMetrics text format for a scraper that asks for
//! it (`Accept: application/openmetrics-text`, as Prometheus does).

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sluice_common::Progress;
use sluice_exec::{QueryInfo, QueryStatus};

/// A metric's labels: (`query`, name) first, then `source`, `sink`,
/// `operator` or `phase`.
type Labels = Vec<(String, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type FloatGauges = Family<Labels, Gauge<f64, AtomicU64>>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Batch phase durations: from 0.5 ms to about 65 s, doubling.
fn duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

/// The metrics of every watched query.
pub(crate) struct Metrics {
    registry: Registry,
    batches: Counters,
    input_rows: Counters,
    output_rows: Counters,
    late_rows: Counters,
    dropped_rows: Counters,
    dead_letter_rows: Counters,
    retries: Counters,
    recovered: Counters,
    failures: Counters,
    batch_duration: Histograms,
    backlog: Gauges,
    watermark_lag: FloatGauges,
    latency: FloatGauges,
    input_rate: FloatGauges,
    processing_rate: FloatGauges,
    state_rows: Gauges,
    state_bytes: Gauges,
    state_written: Counters,
    last_batch: Gauges,
    falling_behind: Gauges,
    active: Gauges,
    /// Queries (by name and id) whose failure is counted.
    failed: Mutex<HashSet<(String, String)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let batches = Counters::default();
        registry.register("batches", "Micro-batches committed", batches.clone());
        let input_rows = Counters::default();
        registry.register(
            "input_rows",
            "Rows read from a source (after bad rows are dropped)",
            input_rows.clone(),
        );
        let output_rows = Counters::default();
        registry.register(
            "output_rows",
            "Rows written to the sink",
            output_rows.clone(),
        );
        let late_rows = Counters::default();
        registry.register(
            "late_rows",
            "Rows left out because their window had closed",
            late_rows.clone(),
        );
        let dropped_rows = Counters::default();
        registry.register(
            "dropped_rows",
            "Records that could not be decoded and were dropped (on_error = 'drop')",
            dropped_rows.clone(),
        );
        let dead_letter_rows = Counters::default();
        registry.register(
            "dead_letter_rows",
            "Records that could not be decoded and went to the dead-letter table",
            dead_letter_rows.clone(),
        );
        let retries = Counters::default();
        registry.register(
            "batch_retries",
            "Retries of batches after transient errors",
            retries.clone(),
        );
        let recovered = Counters::default();
        registry.register(
            "recovered_batches",
            "Batches re-run after a restart found them planned but not committed",
            recovered.clone(),
        );
        let failures = Counters::default();
        registry.register(
            "query_failures",
            "Queries that stopped on an error",
            failures.clone(),
        );
        let batch_duration = Histograms::new_with_constructor(duration_buckets as fn() -> _);
        registry.register(
            "batch_duration_seconds",
            "Time per batch phase (offsets, offset_log, read, execute, state_commit, sink, commit_log) and in all (total)",
            batch_duration.clone(),
        );
        let backlog = Gauges::default();
        registry.register(
            "backlog",
            "Data available but not taken when the last batch was planned, in rows (files for a file source, see the unit label)",
            backlog.clone(),
        );
        let watermark_lag = FloatGauges::default();
        registry.register(
            "watermark_lag_seconds",
            "How far the watermark is behind the last batch's start",
            watermark_lag.clone(),
        );
        let latency = FloatGauges::default();
        registry.register(
            "end_to_end_latency_seconds",
            "From when the oldest record of the last batch became available to the batch's commit",
            latency.clone(),
        );
        let input_rate = FloatGauges::default();
        registry.register(
            "input_rows_per_second",
            "Input rows per second between the last two batch starts",
            input_rate.clone(),
        );
        let processing_rate = FloatGauges::default();
        registry.register(
            "processed_rows_per_second",
            "Input rows per second of the last batch's own processing time",
            processing_rate.clone(),
        );
        let state_rows = Gauges::default();
        registry.register(
            "state_rows",
            "Keys held by a stateful operator",
            state_rows.clone(),
        );
        let state_bytes = Gauges::default();
        registry.register(
            "state_memory_bytes",
            "Approximate bytes of a stateful operator's state in memory",
            state_bytes.clone(),
        );
        let state_written = Counters::default();
        registry.register(
            "state_written_bytes",
            "Bytes of state files written",
            state_written.clone(),
        );
        let last_batch = Gauges::default();
        registry.register(
            "last_batch_id",
            "The id of the last committed batch",
            last_batch.clone(),
        );
        let falling_behind = Gauges::default();
        registry.register(
            "falling_behind",
            "1 when the last batch took longer than the trigger interval or the backlog grew batch after batch",
            falling_behind.clone(),
        );
        let active = Gauges::default();
        registry.register(
            "query_active",
            "1 while the query runs, 0 once it stopped or failed",
            active.clone(),
        );
        Metrics {
            registry,
            batches,
            input_rows,
            output_rows,
            late_rows,
            dropped_rows,
            dead_letter_rows,
            retries,
            recovered,
            failures,
            batch_duration,
            backlog,
            watermark_lag,
            latency,
            input_rate,
            processing_rate,
            state_rows,
            state_bytes,
            state_written,
            last_batch,
            falling_behind,
            active,
            failed: Mutex::default(),
        }
    }
}

fn labels(query: &str, more: &[(&str, &str)]) -> Labels {
    let mut l = vec![("query".to_string(), query.to_string())];
    l.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    l
}

impl Metrics {
    /// Counts one batch of the query whose sink is `sink`.
    pub(crate) fn record(&self, sink: &str, p: &Progress) {
        let q = labels(&p.name, &[]);
        self.batches.get_or_create(&q).inc();
        self.output_rows
            .get_or_create(&labels(&p.name, &[("sink", sink)]))
            .inc_by(p.output_rows);
        self.late_rows.get_or_create(&q).inc_by(p.late_rows);
        self.retries.get_or_create(&q).inc_by(u64::from(p.retries));
        self.recovered
            .get_or_create(&q)
            .inc_by(u64::from(p.recovered));
        for s in &p.sources {
            let l = labels(&p.name, &[("source", &s.name)]);
            self.input_rows.get_or_create(&l).inc_by(s.input_rows);
            self.dropped_rows.get_or_create(&l).inc_by(s.dropped_rows);
            self.dead_letter_rows
                .get_or_create(&l)
                .inc_by(s.dead_letter_rows);
            if let Some(b) = s.backlog {
                let unit = s.backlog_unit.as_deref().unwrap_or("rows");
                self.backlog
                    .get_or_create(&labels(&p.name, &[("source", &s.name), ("unit", unit)]))
                    .set(i64::try_from(b).unwrap_or(i64::MAX));
            }
        }
        for (phase, ms) in &p.durations_ms {
            self.batch_duration
                .get_or_create(&labels(&p.name, &[("phase", phase)]))
                .observe(ms / 1000.0);
        }
        if let Some(w) = p.watermark_ms {
            self.watermark_lag
                .get_or_create(&q)
                .set((p.timestamp_ms - w) as f64 / 1000.0);
        }
        if let Some(l) = p.latency_ms {
            self.latency.get_or_create(&q).set(l / 1000.0);
        }
        self.input_rate
            .get_or_create(&q)
            .set(p.input_rows_per_second);
        self.processing_rate
            .get_or_create(&q)
            .set(p.processed_rows_per_second);
        for o in &p.operators {
            let l = labels(&p.name, &[("operator", &o.id)]);
            self.state_rows
                .get_or_create(&l)
                .set(i64::try_from(o.rows).unwrap_or(i64::MAX));
            self.state_bytes
                .get_or_create(&l)
                .set(i64::try_from(o.memory_bytes).unwrap_or(i64::MAX));
            self.state_written.get_or_create(&l).inc_by(o.bytes_written);
        }
        self.last_batch
            .get_or_create(&q)
            .set(i64::try_from(p.batch_id).unwrap_or(i64::MAX));
        self.falling_behind
            .get_or_create(&q)
            .set(i64::from(p.falling_behind));
    }

    /// The metrics as text, with each query's status as of now, and the
    /// text's content type: OpenMetrics when `openmetrics`, otherwise
    /// Prometheus's text format 0.0.4.
    pub(crate) fn encode(
        &self,
        queries: &[QueryInfo],
        openmetrics: bool,
    ) -> (String, &'static str) {
        for info in queries {
            let q = labels(&info.name, &[]);
            let status = info.status();
            self.active
                .get_or_create(&q)
                .set(i64::from(status == QueryStatus::Active));
            // Present (at 0) for every query, so a rate over it works.
            let failures = self.failures.get_or_create(&q);
            if matches!(status, QueryStatus::Failed(_))
                && self
                    .failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((info.name.clone(), info.id.clone()))
            {
                failures.inc();
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        if openmetrics {
            let _ = text::encode(&mut out, &self.registry);
            (
                out,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        } else {
            let _ = prometheus_text::encode(&mut out, &self.registry);
            (out, prometheus_text::CONTENT_TYPE)
        }
    }
}
