//! `GET /metrics`: the serving path's figures (requests, tokens, time to first token and
//! between tokens, batch size, KV-cache use, adapter loads, the waiting line) kept as they
//! happen, and the queue's (jobs per status, running jobs and free memory per worker) read
//! from the database when scraped, in Prometheus' text exposition format through the
//! `prometheus` crate. Nothing here names a tenant, a job or a model.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the process keeps, registered under the `qtune_` prefix.
pub struct Metrics {
    registry: Registry,
    /// Generations ended, by `finish`: stop, length, error, abandoned (the client hung up).
    pub generations: IntCounterVec,
    /// Requests refused because the waiting line was full (answered 429).
    pub generations_rejected: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// Requests decoded together per decode step.
    pub batch_rows: Histogram,
    pub generations_running: IntGauge,
    pub generations_waiting: IntGauge,
    pub kv_cache_bytes: IntGauge,
    pub kv_cache_budget_bytes: IntGauge,
    /// Adapter lookups by `outcome`: hit (resident) or load.
    pub adapter_requests: IntCounterVec,
    pub adapters_loaded: IntGauge,
    pub bases_loaded: IntGauge,
    jobs: IntGaugeVec,
    worker_running_jobs: IntGaugeVec,
    worker_free_bytes: IntGaugeVec,
}

/// What the queue looks like now, read from the database at a scrape.
pub struct QueueSnapshot {
    /// Jobs per status.
    pub jobs: Vec<(String, i64)>,
    /// Running jobs per worker, for every live worker (0 for an idle one).
    pub running_per_worker: Vec<(String, i64)>,
    /// Free memory per live worker, as it last reported it.
    pub free_bytes_per_worker: Vec<(String, i64)>,
}

fn seconds_buckets() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("qtune".into()), None).expect("a valid metric prefix");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("a valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let counters = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("a valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("a valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let gauges = |name: &str, help: &str, label: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("a valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let opts = HistogramOpts::new(name, help).buckets(buckets);
            let h = Histogram::with_opts(opts).expect("a valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("registered once");
            h
        };
        Metrics {
            generations: counters(
                "generations_total",
                "Chat and completion generations ended, by how they ended.",
                "finish",
            ),
            generations_rejected: counter(
                "generations_rejected_total",
                "Generation requests answered 429 because the waiting line was full.",
            ),
            prompt_tokens: counter("prompt_tokens_total", "Prompt tokens prefilled."),
            generated_tokens: counter("generated_tokens_total", "Tokens generated."),
            time_to_first_token: histogram(
                "time_to_first_token_seconds",
                "From a request's arrival in the decode loop to its first token.",
                seconds_buckets(),
            ),
            inter_token_latency: histogram(
                "inter_token_latency_seconds",
                "Between two tokens of one answer.",
                seconds_buckets(),
            ),
            batch_rows: histogram(
                "decode_batch_rows",
                "Requests decoded together in one decode step.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            ),
            generations_running: gauge("generations_running", "Requests in a decode batch now."),
            generations_waiting: gauge(
                "generations_waiting",
                "Requests waiting for a place in a decode batch.",
            ),
            kv_cache_bytes: gauge(
                "kv_cache_bytes",
                "Bytes of key/value cache reserved by the running requests.",
            ),
            kv_cache_budget_bytes: gauge(
                "kv_cache_budget_bytes",
                "The key/value cache budget (--kv-cache-mib).",
            ),
            adapter_requests: counters(
                "adapter_requests_total",
                "Requests for a fine-tuned model's adapter, by whether it was resident.",
                "outcome",
            ),
            adapters_loaded: gauge("adapters_loaded", "Adapters resident now."),
            bases_loaded: gauge("base_models_loaded", "Base models resident now."),
            jobs: gauges("jobs", "Jobs in the database, by status.", "status"),
            worker_running_jobs: gauges(
                "worker_running_jobs",
                "Jobs each live worker is running.",
                "worker",
            ),
            worker_free_bytes: gauges(
                "worker_free_bytes",
                "Free device memory each live worker last reported.",
                "worker",
            ),
            registry,
        }
    }

    /// Everything, in the text exposition format, with the queue as `queue` shows it.
    pub fn render(&self, queue: &QueueSnapshot) -> String {
        self.jobs.reset();
        for (status, n) in &queue.jobs {
            self.jobs.with_label_values(&[status.as_str()]).set(*n);
        }
        self.worker_running_jobs.reset();
        for (worker, n) in &queue.running_per_worker {
            self.worker_running_jobs
                .with_label_values(&[worker.as_str()])
                .set(*n);
        }
        self.worker_free_bytes.reset();
        for (worker, n) in &queue.free_bytes_per_worker {
            self.worker_free_bytes
                .with_label_values(&[worker.as_str()])
                .set(*n);
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding into memory does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
