//! The results files of succeeded jobs (`file-results-{job id}`): their step metrics as CSV,
//! in the columns of OpenAI's results files, listed and downloaded through `/v1/files`.

use axum::Json;
use serde_json::Value;

use super::views::RESULTS_PREFIX;
use crate::api::{jobs, ApiError, Owner};
use crate::db::{JobRow, Order};
use crate::job::{unix_seconds, FileStatus, FileView, JobId, JobStatus};
use crate::state::AppState;

/// The purpose of the files qtune makes from a job's step metrics.
pub const RESULTS_PURPOSE: &str = "fine-tune-results";

/// The job whose results file `file_id` names (`file-results-{job id}`).
pub fn results_file_job(file_id: &str) -> Option<JobId> {
    JobId::parse(file_id.strip_prefix(RESULTS_PREFIX)?)
}

/// A succeeded job's results file — its step metrics as CSV, in the columns of OpenAI's
/// results files — and the file's record.
pub async fn results_file(
    state: &AppState,
    owner: &Owner,
    job: &JobId,
) -> Result<(FileView, String), ApiError> {
    let id = format!("{RESULTS_PREFIX}{job}");
    let row = state
        .db
        .get_job(job, owner.as_deref())
        .await?
        .filter(|r| r.status == JobStatus::Succeeded)
        .ok_or_else(|| ApiError::not_found("file", &id))?;
    results_file_of(state, &row).await
}

/// The results file of `row`, a succeeded job already read.
async fn results_file_of(state: &AppState, row: &JobRow) -> Result<(FileView, String), ApiError> {
    let id = format!("{RESULTS_PREFIX}{}", row.id);
    let curve = jobs::curve(state, &row.id).await?;
    let cell = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    let mut csv =
        String::from("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n");
    for r in curve.iter().filter(|r| !r.is_eval()) {
        let valid = curve.iter().find(|v| v.step == r.step && v.is_eval());
        csv += &format!(
            "{},{},{},{},{}\n",
            r.step,
            cell(r.train_loss),
            cell(r.train_accuracy),
            cell(valid.and_then(|v| v.eval_loss)),
            cell(valid.and_then(|v| v.eval_accuracy)),
        );
    }
    let view = FileView {
        object: "file".into(),
        id,
        bytes: csv.len() as i64,
        created_at: row.finished_at.as_deref().map(unix_seconds).unwrap_or(0),
        filename: "step_metrics.csv".into(),
        purpose: RESULTS_PURPOSE.into(),
        status: FileStatus::Processed,
        status_details: None,
        sha256: None,
    };
    Ok((view, csv))
}

/// `GET /v1/files?purpose=fine-tune-results`: the results files of the caller's succeeded jobs,
/// newest first.
pub async fn list_results_files(
    state: &AppState,
    owner: &Owner,
    _order: Order,
    after: Option<&str>,
    limit: i64,
) -> Result<Json<Value>, ApiError> {
    let after = match after {
        None => None,
        Some(a) => {
            let job = results_file_job(a)
                .ok_or_else(|| ApiError::bad("after", format!("no file {a:?}")))?;
            Some(jobs::load(state, job.as_str(), owner).await?.seq)
        }
    };
    let mut rows = state
        .db
        .list_jobs(
            owner.as_deref(),
            Some(JobStatus::Succeeded),
            after,
            limit + 1,
        )
        .await?;
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let mut data = Vec::with_capacity(rows.len());
    for r in &rows {
        data.push(results_file_of(state, r).await?.0);
    }
    Ok(Json(crate::api::list_page(&data, has_more, |f| {
        f.id.clone()
    })))
}
