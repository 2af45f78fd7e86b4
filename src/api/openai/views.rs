//! The objects OpenAI's fine-tuning API answers with, typed: `fine_tuning.job`,
//! `fine_tuning.job.event` and `fine_tuning.job.checkpoint`, made from qtune's own rows.

use serde::Serialize;
use serde_json::{json, Value};

use crate::db::{CheckpointRow, JobRow};
use crate::events::{JobEvent, StatusChange};
use crate::job::{unix_seconds, CheckpointRef, JobId, JobStatus, MetricsRow};
use crate::spec::{JobSpec, DEFAULT_LEARNING_RATE};

/// The id of a succeeded job's results file.
pub(super) const RESULTS_PREFIX: &str = "file-results-";

/// `ft:{base}:{suffix}:{job id}`: the name a succeeded job's model goes by, its base as
/// [`crate::model_access::display_name`] shows it (a catalogue name, never a server path).
pub fn fine_tuned_model_name(spec: &JobSpec, job_id: &JobId) -> String {
    format!(
        "ft:{}:{}:{job_id}",
        crate::model_access::display_name(&spec.base_model),
        spec.suffix.as_deref().unwrap_or("")
    )
}

/// The job (and checkpoint step) a `ft:…:{job id}[:ckpt-step-N]` name points at.
pub fn parse_fine_tuned_model(model: &str) -> Option<CheckpointRef> {
    let rest = model.strip_prefix("ft:")?;
    let (rest, step) = match rest.rsplit_once(":ckpt-step-") {
        Some((r, n)) => (r, Some(n.parse().ok()?)),
        None => (rest, None),
    };
    let (_, id) = rest.rsplit_once(':')?;
    Some(CheckpointRef {
        job: JobId::parse(id)?,
        step,
    })
}

#[derive(Debug, Serialize)]
pub struct FineTuningJob {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub model: String,
    pub fine_tuned_model: Option<String>,
    pub organization_id: String,
    pub status: JobStatus,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub result_files: Vec<String>,
    pub trained_tokens: i64,
    pub error: Option<JobError>,
    pub estimated_finish: Option<i64>,
    pub hyperparameters: Hyperparameters,
    pub method: Method,
    pub seed: u64,
    pub suffix: Option<String>,
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
    pub integrations: [(); 0],
    pub user_provided_suffix: Option<String>,
    /// qtune's extension: where the job is.
    pub qtune: JobProgress,
}

#[derive(Debug, Serialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Hyperparameters {
    pub n_epochs: i64,
    pub batch_size: i64,
    pub learning_rate_multiplier: f64,
}

/// `{"type": "supervised", "supervised": {...}}` or `{"type": "dpo", "dpo": {...}}`, as OpenAI's
/// job object has it; an ORPO job (native only) shows its own type and qtune's method.
#[derive(Debug, Serialize)]
pub struct Method {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supervised: Option<Supervised>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpo: Option<Dpo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orpo: Option<Orpo>,
}

#[derive(Debug, Serialize)]
pub struct Supervised {
    pub hyperparameters: Hyperparameters,
}

#[derive(Debug, Serialize)]
pub struct Dpo {
    pub hyperparameters: DpoHyperparameters,
}

#[derive(Debug, Serialize)]
pub struct DpoHyperparameters {
    pub beta: f64,
    #[serde(flatten)]
    pub common: Hyperparameters,
}

#[derive(Debug, Serialize)]
pub struct Orpo {
    pub hyperparameters: DpoHyperparameters,
}

impl Method {
    fn of(spec: &JobSpec) -> Method {
        let hyper = hyperparameters(spec);
        let none = Method {
            kind: "supervised",
            supervised: None,
            dpo: None,
            orpo: None,
        };
        match &spec.method {
            crate::spec::Method::Sft => Method {
                supervised: Some(Supervised {
                    hyperparameters: hyper,
                }),
                ..none
            },
            crate::spec::Method::Dpo(d) => Method {
                kind: "dpo",
                dpo: Some(Dpo {
                    hyperparameters: DpoHyperparameters {
                        beta: d.beta,
                        common: hyper,
                    },
                }),
                ..none
            },
            crate::spec::Method::Orpo(o) => Method {
                kind: "orpo",
                orpo: Some(Orpo {
                    hyperparameters: DpoHyperparameters {
                        beta: o.beta,
                        common: hyper,
                    },
                }),
                ..none
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct JobProgress {
    pub phase: Option<&'static str>,
    pub step: i64,
    pub total_steps: Option<i64>,
    /// Under early stopping, the step whose checkpoint is the fine-tuned model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_step: Option<i64>,
}

fn hyperparameters(spec: &JobSpec) -> Hyperparameters {
    Hyperparameters {
        n_epochs: spec.training.epochs,
        batch_size: spec.training.batch_size,
        learning_rate_multiplier: spec.training.learning_rate / DEFAULT_LEARNING_RATE,
    }
}

impl From<&JobRow> for FineTuningJob {
    fn from(row: &JobRow) -> FineTuningJob {
        let spec = &row.spec;
        let succeeded = row.status == JobStatus::Succeeded;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let hyper = hyperparameters(spec);
        FineTuningJob {
            id: row.id.to_string(),
            object: "fine_tuning.job",
            created_at: unix_seconds(&row.created_at),
            finished_at: row.finished_at.as_deref().map(unix_seconds),
            model: spec.base_model.clone(),
            fine_tuned_model: succeeded.then(|| fine_tuned_model_name(spec, &row.id)),
            organization_id: format!("org-{}", row.owner.as_deref().unwrap_or("qtune")),
            status: row.status,
            training_file: spec.dataset.url.clone(),
            validation_file: spec.dataset.validation_url.clone(),
            result_files: if succeeded {
                vec![format!("{RESULTS_PREFIX}{}", row.id)]
            } else {
                vec![]
            },
            trained_tokens: row.tokens_seen,
            error: row.error_code.as_ref().map(|code| JobError {
                code: code.clone(),
                message: row.error_message.clone().unwrap_or_default(),
                param: None,
            }),
            estimated_finish: row.eta_seconds().map(|left| now + left.round() as i64),
            hyperparameters: hyper,
            method: Method::of(spec),
            seed: spec.seed,
            suffix: spec.suffix.clone(),
            metadata: spec.metadata.clone(),
            integrations: [],
            user_provided_suffix: spec.suffix.clone(),
            qtune: JobProgress {
                phase: row.phase.map(|p| p.as_str()),
                step: row.step,
                total_steps: row.total_steps,
                best_step: row.best_step,
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct JobEventObject {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub level: &'static str,
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub data: Value,
}

impl JobEventObject {
    /// One logged event as a `fine_tuning.job.event`.
    pub fn new(id: i64, created_at: &str, kind: &str, data: &str) -> JobEventObject {
        let (level, message, ty, payload) = match JobEvent::parse(kind, data) {
            Ok(event) => describe(&event),
            Err(_) => ("info", format!("{kind} event"), "message", Value::Null),
        };
        JobEventObject {
            id: format!("ftevent-{id}"),
            object: "fine_tuning.job.event",
            created_at: unix_seconds(created_at),
            level,
            message,
            kind: ty,
            data: payload,
        }
    }
}

/// An event's level, message, type and data, as OpenAI words its own.
fn describe(event: &JobEvent) -> (&'static str, String, &'static str, Value) {
    match event {
        JobEvent::Status(s) => {
            let level = match s.status {
                JobStatus::Failed => "error",
                JobStatus::Cancelled | JobStatus::Paused => "warn",
                _ => "info",
            };
            (level, status_message(s), "message", Value::Null)
        }
        JobEvent::Data(d) => (
            "info",
            format!(
                "Files validated and tokenized: {} training examples ({} tokens), {} steps",
                d.train.examples, d.train.tokens, d.total_steps
            ),
            "message",
            Value::Null,
        ),
        JobEvent::Metrics(m) => metrics_event(m),
        JobEvent::Eval(e) => eval_event(e),
        JobEvent::Checkpoint(c) => (
            "info",
            format!("Checkpoint created at step {}", c.step),
            "message",
            Value::Null,
        ),
    }
}

/// A step as OpenAI's `metrics` event: its loss and accuracy (and a preference step's rewards).
fn metrics_event(m: &crate::job::StepMetrics) -> (&'static str, String, &'static str, Value) {
    let mut data = json!({
        "step": m.step,
        "total_steps": m.total_steps,
        "train_loss": m.train_loss,
        "train_mean_token_accuracy": m.train_accuracy,
        "learning_rate": m.learning_rate,
    });
    with_rewards(&mut data, m.rewards.as_ref(), "");
    let message = format!(
        "Step {}/{}: training loss={:.4}",
        m.step, m.total_steps, m.train_loss
    );
    ("info", message, "metrics", data)
}

/// An evaluation as OpenAI's `metrics` event, under its validation names.
fn eval_event(e: &crate::job::EvalMetrics) -> (&'static str, String, &'static str, Value) {
    let mut data = json!({
        "step": e.step,
        "valid_loss": e.eval_loss,
        "valid_mean_token_accuracy": e.eval_accuracy,
        "full_valid_loss": e.eval_loss,
        "full_valid_mean_token_accuracy": e.eval_accuracy,
    });
    with_rewards(&mut data, e.rewards.as_ref(), "valid_");
    let message = format!("Step {}: validation loss={:.4}", e.step, e.eval_loss);
    ("info", message, "metrics", data)
}

/// A preference step's rewards beside the loss in an event's data, under TRL's names
/// (`rewards/margins`; `valid_rewards/margins` for an evaluation).
fn with_rewards(data: &mut Value, rewards: Option<&crate::job::RewardMetrics>, prefix: &str) {
    let (Some(rewards), Some(obj)) = (rewards, data.as_object_mut()) else {
        return;
    };
    if let Value::Object(fields) = json!(rewards) {
        for (k, v) in fields {
            obj.insert(format!("{prefix}{k}"), v);
        }
    }
}

/// A status change in OpenAI's words ("Job started", "The job has successfully completed"),
/// with its reason or error.
fn status_message(s: &StatusChange) -> String {
    let mut message = match (s.status, s.phase) {
        (JobStatus::Running, Some(phase)) => {
            format!("Job {}", phase.as_str().replace('_', " "))
        }
        (JobStatus::Running, None) => {
            format!("Job started (attempt {})", s.attempt.unwrap_or(1))
        }
        (JobStatus::Succeeded, _) => "The job has successfully completed".to_string(),
        (status, _) => format!("Job {status}"),
    };
    if let Some(reason) = &s.reason {
        message.push_str(&format!(": {reason}"));
    }
    if let Some(err) = &s.error {
        message.push_str(&format!(
            ": {}",
            err.message.as_deref().unwrap_or(&err.code)
        ));
    }
    message
}

#[derive(Debug, Serialize)]
pub struct CheckpointObject {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub step_number: u64,
    pub metrics: CheckpointMetrics,
}

#[derive(Debug, Serialize)]
pub struct CheckpointMetrics {
    pub step: u64,
    pub train_loss: Option<f64>,
    pub train_mean_token_accuracy: Option<f64>,
    pub valid_loss: Option<f64>,
    pub valid_mean_token_accuracy: Option<f64>,
    pub full_valid_loss: Option<f64>,
    pub full_valid_mean_token_accuracy: Option<f64>,
}

impl CheckpointObject {
    /// A recorded checkpoint of `row`'s job with the metrics of its step from `curve`.
    pub fn new(row: &JobRow, c: &CheckpointRow, curve: &[MetricsRow]) -> CheckpointObject {
        let step = c.step as u64;
        let train = curve.iter().find(|r| r.step == step && !r.is_eval());
        let valid = curve.iter().find(|r| r.step == step && r.is_eval());
        CheckpointObject {
            id: format!("ftckpt-{}-{step}", row.id),
            object: "fine_tuning.job.checkpoint",
            created_at: unix_seconds(&c.created_at),
            fine_tuned_model_checkpoint: format!(
                "{}:ckpt-step-{step}",
                fine_tuned_model_name(&row.spec, &row.id)
            ),
            fine_tuning_job_id: row.id.to_string(),
            step_number: step,
            metrics: CheckpointMetrics {
                step,
                train_loss: train.and_then(|r| r.train_loss),
                train_mean_token_accuracy: train.and_then(|r| r.train_accuracy),
                valid_loss: valid.and_then(|r| r.eval_loss),
                valid_mean_token_accuracy: valid.and_then(|r| r.eval_accuracy),
                full_valid_loss: valid.and_then(|r| r.eval_loss),
                full_valid_mean_token_accuracy: valid.and_then(|r| r.eval_accuracy),
            },
        }
    }
}
