//! qtune: a fine-tuning job service in one binary.
//!
//! Data flows one way: JSON → [`spec::JobSpec::from_json`] (the one parse: checked, every
//! default resolved) → a row of the jobs table (`db`, typed) → a worker claims it under a lease
//! → the engine [`train::run`] on a blocking thread, reporting through a sink → events into the
//! database and out over SSE; checkpoints and adapters into the artifact store → downloads.
//!
//! - [`spec`]: the job spec shared by the CLI, the service and the engine (raw → parsed).
//! - [`job`]: what a job is in every room's words: id, status, phase, metrics, the API's views.
//! - [`train`]: the engine (model, LoRA, data, optimizer, checkpoints, exports); no HTTP, no SQL.
//! - [`kernels`]: the CPU kernels the engine's fused paths call: slices in, vectors out.
//! - [`app`], [`config`]: `qtune serve`, assembled: database, artifacts, workers, HTTP server.
//! - [`state`]: what handlers and workers share; [`events`]: job events and their bus.
//! - `http`: serving the router (connection cap, header-read timeout, graceful shutdown).
//! - [`api`]: HTTP handlers, a module per resource with its routes; each handler parses, calls
//!   one service and answers (no SQL, no engine).
//! - The services handlers call: `queue` (submitting with its checks, cancel / pause / resume,
//!   delete), `uploads` (quotas, file status, the training-file check), `estimate` (what a spec
//!   would need on the pool's workers), `inference` (models loaded for chat and completions).
//! - [`db`]: SQLite or PostgreSQL through sqlx; all SQL lives there; the jobs table is the queue;
//!   `relay`: PostgreSQL's LISTEN/NOTIFY carrying events between processes.
//! - [`artifacts`]: where uploads, datasets, checkpoints and adapters live (a directory or S3).
//! - `adapters`: PEFT adapters brought from outside (checked, stored, served by name).
//! - `egress`: which addresses dataset URLs may reach; `model_access`: which base models a job
//!   may name.
//! - [`worker`]: claims jobs under a lease, fetches datasets, runs the engine off the async runtime.
//! - [`metrics`]: what `/metrics` exposes to Prometheus (serving figures, the queue).
//! - `client`: an HTTP client of the job API (the CLI's `submit`, `follow`, ... and `quickstart`).
//! - [`cli`]: the `qtune` command line, with its benchmarks.

pub(crate) mod adapters;
pub mod api;
pub mod app;
pub mod artifacts;
pub mod cli;
pub(crate) mod client;
pub mod config;
pub mod db;
pub(crate) mod disk;
pub(crate) mod egress;
pub(crate) mod estimate;
pub mod events;
pub(crate) mod http;
pub mod inference;
pub mod job;
pub(crate) mod kernels;
pub mod metrics;
pub(crate) mod model_access;
pub(crate) mod queue;
pub(crate) mod relay;
pub(crate) mod retry;
pub mod spec;
pub mod state;
pub mod train;
pub(crate) mod uploads;
pub mod worker;

/// Hands the memory freed by a finished job back to the system. [`tune_process`] has the
/// allocator keep freed memory for the next training step; between jobs an idle server should
/// not hold gigabytes it no longer uses.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only returns free pages of glibc's heaps to the kernel.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Process-wide settings for training speed; call first thing in `main`, before any thread starts.
///
/// - glibc keeps large freed buffers instead of returning each to the OS: training allocates and
///   frees the same big buffers every step, and with the defaults each one is a fresh `mmap`
///   (measured: a third of the step in page faults).
/// - candle's worker threads spin for a short while only (1,000 spins instead of 25,000) before
///   they sleep: oneDNN's multiplies run on the same cores, and a worker spinning after every
///   elementwise op took a core from each of them (10 layers: 810 → 930 tokens/s). An explicit
///   `CANDLE_BARRIER_POOL_SPIN_LIMIT` is left as it is.
/// - candle's matmul asks for its thread count on every call, and without `RAYON_NUM_THREADS`
///   works it out from `/proc/cpuinfo` each time (measured: an eighth of a SmolLM2 decode step
///   spent in the kernel printing cpuinfo). It is set once to the count candle works out.
pub fn tune_process() {
    // oneDNN's OpenMP threads spin after each call by default, stealing the cores from the
    // elementwise ops candle runs in between (measured: 211 → 266 tokens/s with passive
    // waiting). libgomp reads it when oneDNN is first loaded; set here, before any thread that
    // could read the environment exists.
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        std::env::set_var("OMP_WAIT_POLICY", "passive");
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator tunables; called before any threads start.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_TOP_PAD, 1 << 30);
        }
    }
}
