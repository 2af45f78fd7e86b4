//! Uploaded files as a service: how much a key may still store, the record of a stored upload
//! (once per `Idempotency-Key`), and the check that makes a training file `processed` (every
//! record read through the engine's own record checks) or `error` (naming the line of the first
//! bad record). Handlers call this; it knows no HTTP.

use futures_util::StreamExt;

use crate::artifacts::{ArtifactStore, Key, PutError};
use crate::db::{FileRow, KeyClaim};
use crate::job::{FileDigest, FileStatus};
use crate::spec::DatasetFormat;
use crate::state::AppState;

/// The one purpose an upload may have: a dataset for fine-tuning (`fine-tune-results` files are
/// made by qtune from a job's metrics).
pub const UPLOAD_PURPOSE: &str = "fine-tune";

/// How many bytes an upload may bring: the operator's per-upload limit, and what is left of
/// the key's storage quota.
#[derive(Debug, Clone, Copy)]
pub struct UploadRoom {
    upload_limit: u64,
    /// What the key may still store (`u64::MAX` without a quota).
    left: u64,
    upload_mib: u64,
    quota_mib: u64,
}

impl UploadRoom {
    pub async fn for_owner(
        state: &AppState,
        owner: Option<&str>,
    ) -> Result<UploadRoom, UploadError> {
        if let Some(free_bytes) = crate::disk::short_of_space(&state.config) {
            return Err(UploadError::DiskFull { free_bytes });
        }
        let (upload_mib, quota_mib) = (
            state.config.max_upload_mib,
            state.config.max_stored_mib_per_key,
        );
        let left = match quota_mib {
            0 => u64::MAX,
            q => (q * 1024 * 1024).saturating_sub(state.db.stored_bytes(owner).await?),
        };
        Ok(UploadRoom {
            upload_limit: upload_mib * 1024 * 1024,
            left,
            upload_mib,
            quota_mib,
        })
    }

    /// The most bytes the store may take for this upload.
    pub fn limit(&self) -> u64 {
        self.upload_limit.min(self.left)
    }

    /// Refuses, before reading it, a body whose announced length cannot fit: over the upload
    /// limit is too large; over what the quota leaves is a quota.
    pub fn check_announced(&self, announced: Option<u64>) -> Result<(), UploadError> {
        if announced.is_some_and(|n| n > self.upload_limit) {
            return Err(self.too_large());
        }
        if self.left == 0 || announced.is_some_and(|n| n > self.limit()) {
            return Err(self.over_quota());
        }
        Ok(())
    }

    /// Why the store refused a body.
    pub fn refused(&self, e: PutError) -> UploadError {
        match e {
            PutError::TooLarge { .. } if self.limit() < self.upload_limit => self.over_quota(),
            PutError::TooLarge { .. } => self.too_large(),
            PutError::Body(e) => UploadError::Body(e),
            PutError::Io(e) if crate::disk::is_full(&e) => UploadError::DiskFull { free_bytes: 0 },
            PutError::Io(e) => UploadError::Io(e),
        }
    }

    fn too_large(&self) -> UploadError {
        UploadError::TooLarge {
            limit_mib: self.upload_mib,
        }
    }

    fn over_quota(&self) -> UploadError {
        UploadError::OverQuota {
            quota_mib: self.quota_mib,
        }
    }
}

/// A body the store has taken, to be recorded as the caller's file.
pub struct StoredUpload {
    pub id: String,
    pub key: Key,
    pub digest: FileDigest,
    pub filename: Option<String>,
    pub purpose: String,
}

/// Records a stored upload as the owner's file; with an `Idempotency-Key` that a same upload
/// used before, the stored copy is dropped and the first file answered. The second value says
/// whether the file is new.
pub async fn record(
    state: &AppState,
    owner: Option<&str>,
    upload: StoredUpload,
    idempotency_key: Option<&str>,
) -> Result<(FileRow, bool), UploadError> {
    if upload.digest.bytes == 0 {
        state.artifacts.delete(&upload.key).await?;
        return Err(UploadError::Empty);
    }
    if let Some(idem) = idempotency_key {
        let request = format!("{}:{}", upload.purpose, upload.digest.sha256);
        let scope = owner.unwrap_or("");
        let claim = state
            .db
            .claim_idempotency_key(scope, "files", idem, &request, &upload.id)
            .await?;
        if claim != KeyClaim::Bound {
            state.artifacts.delete(&upload.key).await?;
        }
        match claim {
            KeyClaim::Bound => {}
            KeyClaim::Reused => return Err(UploadError::KeyReused),
            KeyClaim::Repeat { object_id } => {
                let first = state.db.get_file(&object_id, owner).await?;
                return first
                    .map(|row| (row, false))
                    .ok_or(UploadError::Missing(object_id));
            }
        }
    }
    let row = FileRow {
        id: upload.id,
        owner: owner.map(str::to_string),
        filename: upload.filename,
        bytes: upload.digest.bytes as i64,
        sha256: upload.digest.sha256,
        created_at: crate::db::now(),
        purpose: upload.purpose,
        status: FileStatus::Uploaded,
        status_details: None,
    };
    let quota = match state.config.max_stored_mib_per_key {
        0 => None,
        mib => Some(mib << 20),
    };
    if !state.db.insert_file(&row, quota).await? {
        // another upload of the same key took the room while this one streamed
        state.artifacts.delete(&upload.key).await?;
        return Err(UploadError::OverQuota {
            quota_mib: state.config.max_stored_mib_per_key,
        });
    }
    Ok((row, true))
}

/// What checking a training file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileCheck {
    Valid,
    /// Why not, naming the line.
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the upload is over the {limit_mib} MiB limit (--max-upload-mib)")]
    TooLarge { limit_mib: u64 },
    #[error("this upload would pass this key's {quota_mib} MiB of storage (uploads, checkpoints, exports); delete files or jobs it no longer needs (DELETE /v1/files/{{id}}, DELETE /v1/jobs/{{id}})")]
    OverQuota { quota_mib: u64 },
    #[error("the upload is empty")]
    Empty,
    /// The disk the server keeps files on is (nearly) full: nothing of the upload was kept.
    #[error("this server is short of disk space ({} free); the upload was not kept: try again later", crate::disk::human(*free_bytes))]
    DiskFull { free_bytes: u64 },
    #[error("{0}")]
    Body(String),
    /// The `Idempotency-Key` was used with a different upload.
    #[error("this Idempotency-Key was used with a different request")]
    KeyReused,
    /// The file a repeated upload's key names is gone.
    #[error("no file {0:?}")]
    Missing(String),
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
            return Ok(FileCheck::Invalid(details.unwrap_or("invalid").to_string()))
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

/// The format of a stored JSONL file's first record (`format` when it names one), for telling
/// a file of single answers from one of preference pairs; `None` when no record can be read
/// (the record checks say why).
pub async fn first_record_format(
    state: &AppState,
    id: &str,
    format: DatasetFormat,
) -> std::io::Result<Option<DatasetFormat>> {
    use crate::train::data::parse_line;
    let Some(key) = Key::upload(id) else {
        return Ok(None);
    };
    let max_record = (state.config.max_record_kib * 1024) as usize;
    let found = each_line(
        state.artifacts.as_ref(),
        &key,
        max_record,
        |line, line_no| {
            let mut detected = format;
            match parse_line(line, id, line_no, &mut detected, max_record) {
                Ok(Some(_)) => Some(Some(detected)),
                Ok(None) => None,
                Err(_) => Some(None),
            }
        },
    )
    .await?;
    Ok(found.flatten())
}

/// Hands each line of a stored file to `each` (with its number, from 1; the last one without a
/// newline too) until `each` answers; a line still unended past `max_record` + 2 bytes is handed
/// over as far as it goes, for the record check to refuse by its size.
async fn each_line<T>(
    artifacts: &dyn ArtifactStore,
    key: &Key,
    max_record: usize,
    mut each: impl FnMut(&mut Vec<u8>, usize) -> Option<T>,
) -> std::io::Result<Option<T>> {
    let mut chunks = artifacts.read(key, None).await?;
    let (mut pending, mut line_no) = (Vec::<u8>::new(), 0usize);
    loop {
        let chunk = chunks.next().await;
        let done = chunk.is_none();
        if let Some(chunk) = chunk {
            pending.extend_from_slice(&chunk?);
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = pending.drain(..=end).collect();
            line_no += 1;
            if let Some(answer) = each(&mut line, line_no) {
                return Ok(Some(answer));
            }
        }
        if done || pending.len() > max_record + 2 {
            if pending.is_empty() {
                return Ok(None);
            }
            return Ok(each(&mut pending, line_no + 1));
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
    let mut format = format;
    let mut records = 0usize;
    let mut check = |raw: &mut Vec<u8>, line_no: usize| {
        let record =
            parse_line(raw, shown, line_no, &mut format, max_record).map_err(|e| e.to_string())?;
        if let Some(record) = record {
            let checked = match format.is_preference() {
                true => crate::train::preference::check_record(&record, format),
                false => check_record(&record, format),
            };
            checked.map_err(|e| format!("{shown} line {line_no}: {}", data_message(e)))?;
            records += 1;
        }
        Ok::<(), String>(())
    };
    let first_bad = each_line(artifacts, key, max_record, |raw, line_no| {
        check(raw, line_no).err()
    })
    .await?;
    if let Some(why) = first_bad {
        return Ok(Err(why));
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
