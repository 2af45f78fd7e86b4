//! What a job is, in the words every room shares: its id, status and phase, the metrics of its
//! steps, and the views of jobs, checkpoints and files that the API sends and the client reads.
//! No HTTP, no SQL, no engine here: `db`, `api`, `worker`, `client` and `train` all import this
//! module, and it imports none of them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A job's id: a UUID, kept in its hyphenated text form (as the database and the URLs hold it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    pub fn new() -> JobId {
        JobId(uuid::Uuid::new_v4().to_string())
    }

    /// `None` unless `text` is a UUID: anything else cannot name a job, so lookups answer 404
    /// without asking the database.
    pub fn parse(text: &str) -> Option<JobId> {
        uuid::Uuid::parse_str(text)
            .ok()
            .map(|u| JobId(u.hyphenated().to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for JobId {
    fn default() -> JobId {
        JobId::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a job is in its life. [`JobStatus::ALL`] is the one list: the migration's CHECK
/// constraint mirrors it (a test compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    /// Stopped at a checkpoint on request, off the workers; resuming queues it again.
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed or cancelled: nothing will change it again.
    pub(crate) fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown job status {0:?} (one of queued, running, paused, succeeded, failed, cancelled)")]
pub struct UnknownStatus(pub String);

impl FromStr for JobStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<JobStatus, UnknownStatus> {
        JobStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

impl TryFrom<String> for JobStatus {
    type Error = UnknownStatus;
    fn try_from(s: String) -> Result<JobStatus, UnknownStatus> {
        s.parse()
    }
}

/// What a running job is doing. The engine's own phases (`train::Phase`) map onto the last four;
/// fetching the dataset is the worker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    FetchingDataset,
    LoadingModel,
    Tokenizing,
    Training,
    Saving,
}

impl JobPhase {
    pub const ALL: [JobPhase; 5] = [
        JobPhase::FetchingDataset,
        JobPhase::LoadingModel,
        JobPhase::Tokenizing,
        JobPhase::Training,
        JobPhase::Saving,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::FetchingDataset => "fetching_dataset",
            JobPhase::LoadingModel => "loading_model",
            JobPhase::Tokenizing => "tokenizing",
            JobPhase::Training => "training",
            JobPhase::Saving => "saving",
        }
    }
}

impl FromStr for JobPhase {
    type Err = String;
    fn from_str(s: &str) -> Result<JobPhase, String> {
        JobPhase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown job phase {s:?}"))
    }
}

/// What one optimizer step reports: the engine makes it, the service stores and streams it
/// (SSE `metrics` events), the client and dashboard show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StoredStep")]
pub struct StepMetrics {
    /// Optimizer steps completed, counting this one (1-based).
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    /// Token-weighted mean cross-entropy of the step's label tokens. Events stored before 0.2
    /// call it `loss` only; the SSE event still carries that name too (see [`with_legacy_loss`]).
    pub train_loss: f64,
    /// Fraction of the step's label tokens whose most likely prediction was the label (before
    /// the update). Absent from steps stored before 0.3.
    pub train_accuracy: Option<f64>,
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Input tokens processed by this step (padding excluded).
    pub tokens: usize,
    /// Input tokens of every step through this one: a resumed run counts from its checkpoint,
    /// so steps redone after a crash are not counted twice.
    pub tokens_seen: u64,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    /// A preference step's rewards (TRL's names, `rewards/chosen` …); absent for supervised
    /// steps.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub rewards: Option<RewardMetrics>,
}

/// The preference metrics of a step or an evaluation, under TRL's names: the mean implicit
/// rewards of the chosen and rejected answers (DPO: β·(log π − log π_ref) of the answer; ORPO:
/// β·its mean token log-probability), their mean margin, and the fraction of pairs whose chosen
/// answer has the higher reward.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RewardMetrics {
    #[serde(rename = "rewards/chosen")]
    pub chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rejected: f64,
    #[serde(rename = "rewards/margins")]
    pub margins: f64,
    #[serde(rename = "rewards/accuracies")]
    pub accuracies: f64,
}

/// A stored step as it may come back: with `train_loss`, or with only the `loss` of 0.1.
#[derive(Deserialize)]
struct StoredStep {
    step: u64,
    total_steps: u64,
    epoch: f64,
    train_loss: Option<f64>,
    loss: Option<f64>,
    #[serde(default)]
    train_accuracy: Option<f64>,
    learning_rate: f64,
    grad_norm: f64,
    tokens: usize,
    #[serde(default)]
    tokens_seen: u64,
    tokens_per_second: f64,
    elapsed_seconds: f64,
    #[serde(flatten, default)]
    rewards: Option<RewardMetrics>,
}

impl TryFrom<StoredStep> for StepMetrics {
    type Error = &'static str;
    fn try_from(s: StoredStep) -> Result<StepMetrics, &'static str> {
        Ok(StepMetrics {
            step: s.step,
            total_steps: s.total_steps,
            epoch: s.epoch,
            train_loss: s
                .train_loss
                .or(s.loss)
                .ok_or("missing field `train_loss`")?,
            train_accuracy: s.train_accuracy,
            learning_rate: s.learning_rate,
            grad_norm: s.grad_norm,
            tokens: s.tokens,
            tokens_seen: s.tokens_seen,
            tokens_per_second: s.tokens_per_second,
            elapsed_seconds: s.elapsed_seconds,
            rewards: s.rewards,
        })
    }
}

/// One evaluation on the validation data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub step: u64,
    pub epoch: f64,
    /// Token-weighted mean cross-entropy over every label token of the validation set.
    pub eval_loss: f64,
    /// Fraction of those tokens whose most likely prediction is the label (absent before 0.3).
    #[serde(default)]
    pub eval_accuracy: Option<f64>,
    /// A preference run's rewards on the validation pairs (its `eval_loss` is the method's loss).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub rewards: Option<RewardMetrics>,
}

/// One row of a job's loss curve: a step (eval columns empty) or an evaluation (train columns
/// empty). The same row, with the same names, in `metrics.jsonl`, `GET /v1/jobs/{id}/metrics`
/// (JSON and CSV columns) and the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    pub step: u64,
    pub epoch: f64,
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub learning_rate: Option<f64>,
    pub grad_norm: Option<f64>,
    pub tokens_per_second: Option<f64>,
    #[serde(default)]
    pub train_accuracy: Option<f64>,
    #[serde(default)]
    pub eval_accuracy: Option<f64>,
    #[serde(default, rename = "rewards/chosen")]
    pub rewards_chosen: Option<f64>,
    #[serde(default, rename = "rewards/rejected")]
    pub rewards_rejected: Option<f64>,
    #[serde(default, rename = "rewards/margins")]
    pub rewards_margins: Option<f64>,
    #[serde(default, rename = "rewards/accuracies")]
    pub rewards_accuracies: Option<f64>,
    #[serde(default, rename = "eval_rewards/chosen")]
    pub eval_rewards_chosen: Option<f64>,
    #[serde(default, rename = "eval_rewards/rejected")]
    pub eval_rewards_rejected: Option<f64>,
    #[serde(default, rename = "eval_rewards/margins")]
    pub eval_rewards_margins: Option<f64>,
    #[serde(default, rename = "eval_rewards/accuracies")]
    pub eval_rewards_accuracies: Option<f64>,
}

impl MetricsRow {
    /// The CSV header, in field order (columns added later come last, so that readers of the
    /// older header keep their positions).
    pub(crate) const COLUMNS: [&'static str; 17] = [
        "step",
        "epoch",
        "train_loss",
        "eval_loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "train_accuracy",
        "eval_accuracy",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "eval_rewards/chosen",
        "eval_rewards/rejected",
        "eval_rewards/margins",
        "eval_rewards/accuracies",
    ];

    /// The row as CSV fields, empty where there is no value.
    pub(crate) fn csv_fields(&self) -> [String; 17] {
        let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
        [
            self.step.to_string(),
            self.epoch.to_string(),
            opt(self.train_loss),
            opt(self.eval_loss),
            opt(self.learning_rate),
            opt(self.grad_norm),
            opt(self.tokens_per_second),
            opt(self.train_accuracy),
            opt(self.eval_accuracy),
            opt(self.rewards_chosen),
            opt(self.rewards_rejected),
            opt(self.rewards_margins),
            opt(self.rewards_accuracies),
            opt(self.eval_rewards_chosen),
            opt(self.eval_rewards_rejected),
            opt(self.eval_rewards_margins),
            opt(self.eval_rewards_accuracies),
        ]
    }

    fn empty(step: u64, epoch: f64) -> MetricsRow {
        MetricsRow {
            step,
            epoch,
            train_loss: None,
            eval_loss: None,
            learning_rate: None,
            grad_norm: None,
            tokens_per_second: None,
            train_accuracy: None,
            eval_accuracy: None,
            rewards_chosen: None,
            rewards_rejected: None,
            rewards_margins: None,
            rewards_accuracies: None,
            eval_rewards_chosen: None,
            eval_rewards_rejected: None,
            eval_rewards_margins: None,
            eval_rewards_accuracies: None,
        }
    }

    /// Whether this row is an evaluation (it sorts after the step of the same number).
    pub(crate) fn is_eval(&self) -> bool {
        self.train_loss.is_none()
    }
}

impl From<&StepMetrics> for MetricsRow {
    fn from(m: &StepMetrics) -> MetricsRow {
        MetricsRow {
            step: m.step,
            epoch: m.epoch,
            train_loss: Some(m.train_loss),
            eval_loss: None,
            learning_rate: Some(m.learning_rate),
            grad_norm: Some(m.grad_norm),
            tokens_per_second: Some(m.tokens_per_second),
            train_accuracy: m.train_accuracy,
            eval_accuracy: None,
            rewards_chosen: m.rewards.map(|r| r.chosen),
            rewards_rejected: m.rewards.map(|r| r.rejected),
            rewards_margins: m.rewards.map(|r| r.margins),
            rewards_accuracies: m.rewards.map(|r| r.accuracies),
            ..MetricsRow::empty(m.step, m.epoch)
        }
    }
}

impl From<&EvalMetrics> for MetricsRow {
    fn from(e: &EvalMetrics) -> MetricsRow {
        MetricsRow {
            step: e.step,
            epoch: e.epoch,
            train_loss: None,
            eval_loss: Some(e.eval_loss),
            learning_rate: None,
            grad_norm: None,
            tokens_per_second: None,
            eval_accuracy: e.eval_accuracy,
            eval_rewards_chosen: e.rewards.map(|r| r.chosen),
            eval_rewards_rejected: e.rewards.map(|r| r.rejected),
            eval_rewards_margins: e.rewards.map(|r| r.margins),
            eval_rewards_accuracies: e.rewards.map(|r| r.accuracies),
            ..MetricsRow::empty(e.step, e.epoch)
        }
    }
}

/// Adds `loss` beside `train_loss` (same value) to a serialized step: the name 0.1 published in
/// SSE `metrics` events and `metrics.jsonl`, kept so that readers written for it keep working.
pub(crate) fn with_legacy_loss(mut value: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = value.as_object_mut() {
        if let Some(loss) = obj.get("train_loss").cloned() {
            obj.insert("loss".into(), loss);
        }
    }
    value
}

/// A job's error: a machine-readable code and a message that names what is wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobErrorView {
    pub code: String,
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub step: i64,
    pub total_steps: Option<i64>,
    pub epoch: Option<f64>,
    pub tokens_seen: i64,
    pub elapsed_seconds: Option<f64>,
    pub(crate) eta_seconds: Option<f64>,
}

/// A job as `GET /v1/jobs/{id}` shows it and the client reads it.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub object: String,
    pub status: JobStatus,
    pub phase: Option<String>,
    /// The spec with every default resolved, as JSON: the client and the dashboard read fields
    /// of it without this crate's `JobSpec` type.
    pub spec: Box<RawValue>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub progress: Progress,
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    /// Under early stopping, the step of the best evaluation, whose checkpoint is the adapter.
    #[serde(default)]
    pub best_step: Option<i64>,
    pub error: Option<JobErrorView>,
    pub attempt: i64,
    pub(crate) cancel_requested: bool,
}

impl JobView {
    /// The spec's `base_model`, for listings.
    pub fn base_model(&self) -> String {
        serde_json::from_str::<serde_json::Value>(self.spec.get())
            .ok()
            .and_then(|v| v["base_model"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobList {
    pub object: String,
    pub data: Vec<JobView>,
    pub has_more: bool,
    pub last_id: Option<String>,
}

/// A file of a checkpoint or adapter, as recorded when it was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileDigest {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// A checkpoint as `GET /v1/jobs/{id}/checkpoints` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct CheckpointView {
    pub step: u64,
    pub created_at: String,
    pub files: Vec<FileDigest>,
}

/// A file as `/v1/files` shows it: OpenAI's File object (the routes are shared with the
/// OpenAI-compatible API), with qtune's `sha256` of the content beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileView {
    pub object: String,
    pub id: String,
    pub bytes: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub filename: String,
    /// `fine-tune` (an upload) or `fine-tune-results` (a job's step metrics, made by qtune).
    pub purpose: String,
    pub status: FileStatus,
    pub(crate) status_details: Option<String>,
    pub sha256: Option<String>,
}

/// An uploaded file's state: `uploaded`, `processed` (checked as a training file) or `error`
/// (the check found a bad record; `status_details` says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    Uploaded,
    Processed,
    Error,
}

impl FileStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            FileStatus::Uploaded => "uploaded",
            FileStatus::Processed => "processed",
            FileStatus::Error => "error",
        }
    }
}

impl TryFrom<String> for FileStatus {
    type Error = String;
    fn try_from(s: String) -> Result<FileStatus, String> {
        [
            FileStatus::Uploaded,
            FileStatus::Processed,
            FileStatus::Error,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
        .ok_or_else(|| format!("unknown file status {s:?}"))
    }
}

/// Unix seconds of an RFC 3339 time (as the database keeps them); 0 for text that is not one.
pub(crate) fn unix_seconds(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .unwrap_or(0)
}

/// What `from_checkpoint` names: a job's final adapter (`"<job id>"`) or one of its checkpoints
/// (`"<job id>:<step>"`). Parsed once, here; the API checks it and the worker resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRef {
    pub job: JobId,
    pub step: Option<u64>,
}

impl FromStr for CheckpointRef {
    type Err = String;
    fn from_str(s: &str) -> Result<CheckpointRef, String> {
        let (job, step) = match s.split_once(':') {
            Some((j, st)) => (j, Some(st)),
            None => (s, None),
        };
        let job = JobId::parse(job).ok_or_else(|| format!("no job {job:?}"))?;
        let step = step
            .map(|st| st.parse::<u64>().map_err(|_| format!("bad step {st:?}")))
            .transpose()?;
        Ok(CheckpointRef { job, step })
    }
}

impl fmt::Display for CheckpointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.step {
            Some(step) => write!(f, "{}:{step}", self.job),
            None => write!(f, "{}", self.job),
        }
    }
}

/// In JSON (a job spec's `from_checkpoint`) a reference is its text.
impl Serialize for CheckpointRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CheckpointRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CheckpointRef, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_text() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        assert!("validating_files".parse::<JobStatus>().is_err());
    }

    #[test]
    fn checkpoint_refs_parse_once() {
        let id = JobId::new();
        let r: CheckpointRef = format!("{id}:20").parse().unwrap();
        assert_eq!((r.job, r.step), (id.clone(), Some(20)));
        assert_eq!(id.as_str().parse::<CheckpointRef>().unwrap().step, None);
        assert!(format!("{id}:x").parse::<CheckpointRef>().is_err());
        assert!("../etc:3".parse::<CheckpointRef>().is_err());
    }
}
