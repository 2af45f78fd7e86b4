//! Every integration test in one binary (each test binary links all of candle, axum, sqlx and
//! reqwest: one link instead of thirteen). `helpers` holds what they share.
//!
//! Two tiers: everything outside `full` is the fast tier a developer runs after every change
//! (`cargo test --all-targets -- --skip full::`); `full` (and the few `full` modules inside other
//! files) holds the tests with real models, a browser, PostgreSQL + S3, process kills and the
//! OpenAI SDK, which `./scripts/test.sh` (CI) runs as well.

mod helpers;

mod adapters;
mod api;
mod capacity;
mod cli;
mod client;
mod data;
mod device;
mod docker;
mod docs;
mod engine;
mod families;
mod full;
mod hostile;
mod logs;
mod methods;
mod models;
mod openai;
mod quant;
mod queue;
mod serving;
