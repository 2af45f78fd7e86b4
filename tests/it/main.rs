//! Every integration test in one binary (each test binary links all of candle, axum, sqlx and
//! reqwest: one link instead of thirteen). `helpers` holds what they share.

mod helpers;

mod api;
mod capacity;
mod chaos;
mod cli;
mod client;
mod dashboard;
mod data;
mod device;
mod docker;
mod engine;
mod families;
mod gemma3;
mod hostile;
mod logs;
mod models;
mod openai;
mod quant;
mod queue;
mod quickstart;
mod readme;
mod restart;
mod scale;
mod smollm2;
