//! The full tier: tests with real pretrained models (SmolLM2, Gemma 3), a real browser, real
//! PostgreSQL + S3 servers, processes killed and restarted, the official `openai` SDK, and the
//! quickstart end to end. CI
//! runs them with the rest (`./scripts/test.sh`); the fast tier leaves them out
//! (`cargo test --all-targets -- --skip full::`).

mod chaos;
mod dashboard;
mod docs_examples;
mod gemma3;
mod load;
mod openai_sdk;
mod outages;
mod quickstart;
mod restart;
mod scale;
mod smollm2;
