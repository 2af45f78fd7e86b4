//! How the engine reports: its phases and events, to a [`Reporter`] that may also ask it to stop.

use std::path::PathBuf;

use serde::Serialize;

use super::data::DataSummary;
use crate::job::{EvalMetrics, StepMetrics};

/// Where a run is; the service adds its own phases (fetching the dataset) around these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    LoadingModel,
    Tokenizing,
    Training,
    Saving,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Phase(Phase),
    Data(DataSummary),
    Step(StepMetrics),
    Eval(EvalMetrics),
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
    /// Under early stopping: checkpoint `step` (already reported) holds the best evaluation so
    /// far, and becomes the job's adapter unless a better one follows.
    Best {
        step: u64,
    },
}

/// Receives the engine's progress, and may ask it to stop.
pub trait Reporter {
    fn report(&mut self, event: &Event);
    /// Checked between optimizer steps; `true` makes the run checkpoint and return `Cancelled`.
    fn should_stop(&self) -> bool {
        false
    }
}

/// A reporter that ignores everything (tests, benchmarks).
pub struct Silent;
impl Reporter for Silent {
    fn report(&mut self, _: &Event) {}
}
