//! Uploaded files as a service: their status, and the check that makes a training file
//! `processed` (every record read through the engine's own record checks) or `error` (naming the
//! line of the first bad record). Handlers call this; it knows no HTTP.

use futures_util::StreamExt;

use crate::artifacts::{ArtifactStore, Key};
use crate::job::FileStatus;
use crate::spec::DatasetFormat;
use crate::state::AppState;

/// What checking a training file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCheck {
    Valid,
    /// Why not, naming the line.
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Db(#[from] crate::db::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Checks uploaded file `id` as training data in `format`, once: a file checked before answers
/// with its recorded status; a new check records `processed` or `error` with its details.
pub async fn check_training_file(
    state: &AppState,
    id: &str,
    status: FileStatus,
    details: Option<&str>,
    format: DatasetFormat,
) -> Result<FileCheck, UploadError> {
    match status {
        FileStatus::Processed => return Ok(FileCheck::Valid),
        FileStatus::Error => {
            return Ok(FileCheck::Invalid(
                details.unwrap_or("invalid").to_string(),
            ))
        }
        FileStatus::Uploaded => {}
    }
    let Some(key) = Key::upload(id) else {
        return Ok(FileCheck::Invalid(format!("{id:?} is not an upload's id")));
    };
    let max_record = (state.config.max_record_kib * 1024) as usize;
    match check_jsonl(state.artifacts.as_ref(), &key, id, format, max_record).await? {
        Ok(()) => {
            state
                .db
                .set_file_status(id, FileStatus::Processed, None)
                .await?;
            Ok(FileCheck::Valid)
        }
        Err(details) => {
            state
                .db
                .set_file_status(id, FileStatus::Error, Some(&details))
                .await?;
            Ok(FileCheck::Invalid(details))
        }
    }
}

/// Reads a stored JSONL file through the engine's own record checks: `Ok(Err(why))` names the
/// line of the first bad record.
async fn check_jsonl(
    artifacts: &dyn ArtifactStore,
    key: &Key,
    shown: &str,
    format: DatasetFormat,
    max_record: usize,
) -> std::io::Result<Result<(), String>> {
    use crate::train::data::{check_record, parse_line};
    let mut chunks = artifacts.read(key, None).await?;
    let mut format = format;
    let (mut pending, mut line_no, mut records) = (Vec::<u8>::new(), 0usize, 0usize);
    let check = |raw: &mut Vec<u8>, line_no: usize, format: &mut DatasetFormat| {
        let record =
            parse_line(raw, shown, line_no, format, max_record).map_err(|e| e.to_string())?;
        if let Some(record) = record {
            check_record(&record, *format)
                .map_err(|e| format!("{shown} line {line_no}: {}", data_message(e)))?;
            return Ok::<bool, String>(true);
        }
        Ok(false)
    };
    loop {
        let chunk = chunks.next().await;
        let done = chunk.is_none();
        if let Some(chunk) = chunk {
            pending.extend_from_slice(&chunk?);
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = pending.drain(..=end).collect();
            line_no += 1;
            match check(&mut line, line_no, &mut format) {
                Ok(counted) => records += counted as usize,
                Err(why) => return Ok(Err(why)),
            }
        }
        if pending.len() > max_record + 2 {
            return Ok(Err(format!(
                "{shown} line {}: the record is over {max_record} bytes, the most one record may have",
                line_no + 1
            )));
        }
        if done {
            break;
        }
    }
    if !pending.is_empty() {
        line_no += 1;
        match check(&mut pending, line_no, &mut format) {
            Ok(counted) => records += counted as usize,
            Err(why) => return Ok(Err(why)),
        }
    }
    if records == 0 {
        return Ok(Err(format!("{shown} has no records")));
    }
    Ok(Ok(()))
}

fn data_message(e: crate::train::Error) -> String {
    match e {
        crate::train::Error::Data(m) => m,
        other => other.to_string(),
    }
}

