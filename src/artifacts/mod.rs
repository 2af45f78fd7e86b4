//! Where a job's files live: the one place that knows the layout of uploads, fetched datasets,
//! checkpoints and final adapters, and how they are written (atomically: a temporary file, then
//! a rename) and read back (streamed, with their sha256).
//!
//! Layout, as keys under the store's root:
//! ```text
//! files/{file id}                                  uploaded datasets
//! adapters/{adapter id}/adapter_model.safetensors, adapter_config.json   adapters brought from outside
//! jobs/{job id}/dataset/{train,validation}.jsonl   datasets fetched from a URL
//! jobs/{job id}/output/                            the engine's output folder (see train::checkpoint):
//!     checkpoint-{step}/adapter_model.safetensors, adapter_config.json, optimizer + trainer state
//!     adapter/adapter_model.safetensors, adapter_config.json   the final adapter
//!     adapter.tar                                  the final adapter as one archive
//! ```
//! [`ArtifactStore`] is what the rest of the service uses; [`LocalArtifacts`] keeps everything
//! in a directory (the data dir, which several processes may share), [`s3::S3Artifacts`] in an
//! S3-compatible object store, with a local working copy of what a worker reads and writes.
//! The engine reads and writes local files: a store names the local copy of a key
//! ([`ArtifactStore::local_path`]), [`ArtifactStore::load`]s it from the store before the engine
//! reads it and [`ArtifactStore::save`]s it after the engine wrote it; for the local directory
//! both are nothing, the local copy being the stored file.

pub(crate) mod s3;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::job::{FileDigest, JobId};
use crate::train::checkpoint;

/// The files of a checkpoint or adapter that leave the server (the resume state stays private).
pub(crate) const DOWNLOADABLE: [&str; 2] =
    [checkpoint::ADAPTER_WEIGHTS, checkpoint::ADAPTER_CONFIG];

/// Which dataset of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
}

/// A stored file's key under the store's root. Built only from validated ids (a [`JobId`] is a
/// UUID, an upload id is `file-` and 32 hex digits), so no key can leave the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key(String);

impl Key {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last part of the key: the file's own name.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or_default()
    }

    /// An uploaded dataset; `None` unless `file_id` is one that `POST /v1/files` could issue.
    pub fn upload(file_id: &str) -> Option<Key> {
        is_upload_id(file_id).then(|| Key(format!("files/{file_id}")))
    }

    pub fn dataset(job: &JobId, split: Split) -> Key {
        let name = match split {
            Split::Train => "train.jsonl",
            Split::Validation => "validation.jsonl",
        };
        Key(format!("jobs/{job}/dataset/{name}"))
    }

    /// A file of checkpoint `step`; `None` for files that are not downloadable.
    pub(crate) fn checkpoint_file(job: &JobId, step: u64, name: &str) -> Option<Key> {
        DOWNLOADABLE.contains(&name).then(|| {
            Key(format!(
                "jobs/{job}/output/{}/{name}",
                checkpoint::checkpoint_dir_name(step)
            ))
        })
    }

    /// A file of the final adapter; `None` for files that are not downloadable.
    pub fn adapter_file(job: &JobId, name: &str) -> Option<Key> {
        DOWNLOADABLE.contains(&name).then(|| {
            Key(format!(
                "jobs/{job}/output/{}/{name}",
                checkpoint::ADAPTER_DIR
            ))
        })
    }

    pub fn adapter_tar(job: &JobId) -> Key {
        Key(format!("jobs/{job}/output/adapter.tar"))
    }

    /// The folder of checkpoint `step` (every file in it: the resume state too).
    pub(crate) fn checkpoint_dir(job: &JobId, step: u64) -> Key {
        Key(format!(
            "jobs/{job}/output/{}",
            checkpoint::checkpoint_dir_name(step)
        ))
    }

    /// The folder of the final adapter.
    pub fn adapter_dir(job: &JobId) -> Key {
        Key(format!("jobs/{job}/output/{}", checkpoint::ADAPTER_DIR))
    }

    /// An export of a job's adapter (`merged.tar`, `adapter.gguf`, `model-{type}.gguf`) in the
    /// folder of export `export_id`: `None` for other names or ids.
    pub fn export(job: &JobId, export_id: &str, file: &str) -> Option<Key> {
        let known = ["merged.tar", "adapter.gguf"].contains(&file)
            || file
                .strip_prefix("model-")
                .and_then(|f| f.strip_suffix(".gguf"))
                .is_some_and(|t| crate::train::export::GgufType::parse(t).is_some());
        (known && is_export_id(export_id))
            .then(|| Key(format!("jobs/{job}/exports/{export_id}/{file}")))
    }

    /// The folder of export `export_id` of a job.
    pub(crate) fn export_dir(job: &JobId, export_id: &str) -> Option<Key> {
        is_export_id(export_id).then(|| Key(format!("jobs/{job}/exports/{export_id}")))
    }

    /// The engine's output folder of a job.
    pub fn output_dir(job: &JobId) -> Key {
        Key(format!("jobs/{job}/output"))
    }

    /// The folder of an adapter brought from outside; `None` unless `id` is one that
    /// [`new_adapter_id`] could issue.
    pub(crate) fn outside_adapter_dir(id: &str) -> Option<Key> {
        id.strip_prefix("adapter-")
            .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Key(format!("adapters/{id}")))
    }

    /// Everything of a job.
    pub(crate) fn job_prefix(job: &JobId) -> Key {
        Key(format!("jobs/{job}"))
    }
}

/// `file-` and 32 lowercase hex digits: the ids [`new_upload_id`] makes.
pub(crate) fn is_upload_id(s: &str) -> bool {
    s.strip_prefix("file-")
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// 16 lowercase hex digits: the ids [`new_export_id`] makes.
fn is_export_id(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) fn new_export_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_string()
}

pub(crate) fn new_adapter_id() -> String {
    format!("adapter-{}", uuid::Uuid::new_v4().simple())
}

pub(crate) fn new_upload_id() -> String {
    format!("file-{}", uuid::Uuid::new_v4().simple())
}

/// Why a streamed write did not store anything.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("over the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// The body stopped (a client that went away, a bad multipart part).
    #[error("the upload broke off: {0}")]
    Body(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A stored file's bytes, streamed.
pub(crate) type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

pub trait ArtifactStore: Send + Sync {
    /// Stores a stream under `key` atomically, hashing as it goes, never holding it whole;
    /// refuses it (storing nothing) once it passes `limit` bytes.
    fn put_stream<'a>(
        &'a self,
        key: &'a Key,
        body: BoxStream<'a, Result<Bytes, String>>,
        limit: u64,
    ) -> BoxFuture<'a, Result<FileDigest, PutError>>;

    /// A stored file's size; `None` if it does not exist.
    fn size<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<Option<u64>>>;

    /// A stored file's bytes, all of them or the inclusive range `(first, last)`.
    fn read<'a>(
        &'a self,
        key: &'a Key,
        range: Option<(u64, u64)>,
    ) -> BoxFuture<'a, std::io::Result<ByteStream>>;

    /// Removes a stored file; a missing one is not an error.
    fn delete<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<()>>;

    /// Removes everything a job stored (datasets, checkpoints, adapter).
    fn delete_job<'a>(&'a self, job: &'a JobId) -> BoxFuture<'a, std::io::Result<()>>;

    /// Size and sha256 of a stored file.
    fn digest<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<FileDigest>>;

    /// The local copy of `key`: the file (or folder) the engine reads or writes.
    fn local_path(&self, key: &Key) -> PathBuf;

    /// Makes the local copy of a stored file current; `false` if nothing is stored under `key`.
    fn load<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<bool>>;

    /// Stores the local copy of `key` (written by a download or the engine).
    fn save<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<()>>;

    /// Makes the local copy of every file stored under folder `key` current; `false` if none is.
    fn load_dir<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<bool>>;

    /// Stores every file of the local folder `key`.
    fn save_dir<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<()>>;

    /// Removes every file stored under folder `key`, and its local copy.
    fn delete_dir<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<()>>;

    /// The local folder the engine writes a job's checkpoints and adapter into.
    fn job_output_dir(&self, job: &JobId) -> PathBuf {
        self.local_path(&Key::output_dir(job))
    }

    /// The local folder of a stored adapter (a job's final adapter, or its checkpoint at
    /// `step`), loaded from the store and checked against the digests `recorded` when it was
    /// written: a file that no longer matches is an `InvalidData` error naming it, and the
    /// adapter is not used (by chat, `from_checkpoint` or an export).
    fn init_adapter_dir<'a>(
        &'a self,
        job: &'a JobId,
        step: Option<u64>,
        recorded: &'a [FileDigest],
    ) -> BoxFuture<'a, std::io::Result<PathBuf>> {
        Box::pin(async move {
            let key = match step {
                Some(step) => Key::checkpoint_dir(job, step),
                None => Key::adapter_dir(job),
            };
            self.load_dir(&key).await?;
            let dir = self.local_path(&key);
            for want in recorded
                .iter()
                .filter(|d| DOWNLOADABLE.contains(&d.name.as_str()))
            {
                let got = digest_file(&dir.join(&want.name)).await?;
                if got.bytes != want.bytes || got.sha256 != want.sha256 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{} no longer matches the sha256 recorded when it was written",
                            want.name
                        ),
                    ));
                }
            }
            Ok(dir)
        })
    }

    /// Writes the job's final adapter folder as one tar archive (for `GET …/adapter`) and stores
    /// both; returns the digests of the archive and of each downloadable file, to be recorded.
    fn pack_adapter<'a>(
        &'a self,
        job: &'a JobId,
    ) -> BoxFuture<'a, std::io::Result<Vec<FileDigest>>> {
        Box::pin(async move {
            let adapter = self.local_path(&Key::adapter_dir(job));
            let tar = self.local_path(&Key::adapter_tar(job));
            let (dir, dest) = (adapter.clone(), tar.clone());
            tokio::task::spawn_blocking(move || write_tar(&dir, &dest)).await??;
            let mut digests = vec![digest_file(&tar).await?];
            for name in DOWNLOADABLE {
                digests.push(digest_file(&adapter.join(name)).await?);
            }
            self.save_dir(&Key::adapter_dir(job)).await?;
            self.save(&Key::adapter_tar(job)).await?;
            Ok(digests)
        })
    }
}

/// Every artifact in one local directory (the data dir).
pub(crate) struct LocalArtifacts {
    root: PathBuf,
    /// When [`LocalArtifacts::sweep_interrupted`] last ran.
    swept: std::sync::Mutex<std::time::Instant>,
}

/// A temporary upload file untouched this long was cut off by a crash: a live upload writes at
/// least every 30 seconds (slower ones are cut off by the API's minimum body rate), and other
/// processes may share the directory, so the margin is wide.
const INTERRUPTED_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

impl LocalArtifacts {
    /// Opens (creating) the directory, and removes the temporary files of uploads that a crash
    /// interrupted (they were never renamed into place, so nothing refers to them).
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<LocalArtifacts> {
        let root = root.into();
        std::fs::create_dir_all(root.join("files"))?;
        std::fs::create_dir_all(root.join("jobs"))?;
        sweep_interrupted(&root.join("files"))?;
        Ok(LocalArtifacts {
            root,
            swept: std::sync::Mutex::new(std::time::Instant::now()),
        })
    }

    /// [`sweep_interrupted`] again, at most every 10 seconds: run as uploads begin, so that the
    /// leftovers of a process killed mid-upload go without waiting for a restart.
    fn sweep_interrupted_if_due(&self) {
        {
            let mut swept = self.swept.lock().unwrap_or_else(|p| p.into_inner());
            if swept.elapsed() < std::time::Duration::from_secs(10) {
                return;
            }
            *swept = std::time::Instant::now();
        }
        let dir = self.root.join("files");
        tokio::task::spawn_blocking(move || {
            if let Err(e) = sweep_interrupted(&dir) {
                tracing::warn!(error = %e, "sweeping interrupted uploads failed");
            }
        });
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.root.join(&key.0)
    }
}

impl ArtifactStore for LocalArtifacts {
    fn put_stream<'a>(
        &'a self,
        key: &'a Key,
        mut body: BoxStream<'a, Result<Bytes, String>>,
        limit: u64,
    ) -> BoxFuture<'a, Result<FileDigest, PutError>> {
        Box::pin(async move {
            self.sweep_interrupted_if_due();
            let path = self.path(key);
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            let tmp = path.with_extension("part");
            let written = async {
                let mut file = tokio::fs::File::create(&tmp).await?;
                let mut hasher = Sha256::new();
                let mut total = 0u64;
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(PutError::Body)?;
                    total += chunk.len() as u64;
                    if total > limit {
                        return Err(PutError::TooLarge { limit });
                    }
                    hasher.update(&chunk);
                    file.write_all(&chunk).await?;
                }
                file.sync_all().await?;
                Ok(FileDigest {
                    name: file_name(&path),
                    bytes: total,
                    sha256: hex(&hasher.finalize()),
                })
            }
            .await;
            match written {
                Ok(digest) => {
                    tokio::fs::rename(&tmp, &path).await?;
                    Ok(digest)
                }
                Err(e) => {
                    // nothing of a refused or broken upload is kept
                    tokio::fs::remove_file(&tmp).await.ok();
                    Err(e)
                }
            }
        })
    }

    fn size<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<Option<u64>>> {
        Box::pin(async move {
            match tokio::fs::metadata(self.path(key)).await {
                Ok(m) if m.is_file() => Ok(Some(m.len())),
                Ok(_) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn read<'a>(
        &'a self,
        key: &'a Key,
        range: Option<(u64, u64)>,
    ) -> BoxFuture<'a, std::io::Result<ByteStream>> {
        Box::pin(async move {
            use tokio::io::AsyncSeekExt;
            let mut file = tokio::fs::File::open(self.path(key)).await?;
            Ok(match range {
                Some((first, last)) => {
                    file.seek(std::io::SeekFrom::Start(first)).await?;
                    tokio_util::io::ReaderStream::new(file.take(last - first + 1)).boxed()
                }
                None => tokio_util::io::ReaderStream::new(file).boxed(),
            })
        })
    }

    fn digest<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<FileDigest>> {
        Box::pin(async move { digest_file(&self.path(key)).await })
    }

    fn delete_job<'a>(&'a self, job: &'a JobId) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            match tokio::fs::remove_dir_all(self.root.join("jobs").join(job.as_str())).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            match tokio::fs::remove_file(self.path(key)).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        })
    }

    fn local_path(&self, key: &Key) -> PathBuf {
        self.path(key)
    }

    // The local copy is the stored file itself.
    fn load<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<bool>> {
        Box::pin(async move { Ok(self.path(key).is_file()) })
    }

    fn save<'a>(&'a self, _key: &'a Key) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn load_dir<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<bool>> {
        Box::pin(async move { Ok(self.path(key).is_dir()) })
    }

    fn save_dir<'a>(&'a self, _key: &'a Key) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn delete_dir<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            match tokio::fs::remove_dir_all(self.path(key)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
    }
}

/// Removes the `.part` files in `dir` untouched for [`INTERRUPTED_AFTER`]; returns how many.
fn sweep_interrupted(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > INTERRUPTED_AFTER);
        if entry.file_name().to_string_lossy().ends_with(".part") && stale {
            tracing::info!(path = %entry.path().display(), "removing an interrupted upload");
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                // another process sharing the directory swept it first
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// The bytes of the files in a local folder (one level: a checkpoint's or adapter's folder).
pub(crate) fn dir_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Size and sha256 of a local file, read in 64 KiB pieces.
pub(crate) async fn digest_file(path: &Path) -> std::io::Result<FileDigest> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok(FileDigest {
        name: file_name(path),
        bytes: total,
        sha256: hex(&hasher.finalize()),
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// The PEFT folder as one tar archive under the name `adapter/`, written atomically.
fn write_tar(dir: &Path, dest: &Path) -> std::io::Result<()> {
    write_tar_as(dir, checkpoint::ADAPTER_DIR, dest)
}

/// Writes folder `dir` into the tar archive `dest` (atomically) as the folder `name`.
pub(crate) fn write_tar_as(dir: &Path, name: &str, dest: &Path) -> std::io::Result<()> {
    let tmp = dest.with_extension("tar.part");
    let mut builder = tar::Builder::new(std::fs::File::create(&tmp)?);
    builder.append_dir_all(name, dir)?;
    builder.into_inner()?.sync_all()?;
    std::fs::rename(tmp, dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_under_the_root() {
        assert!(Key::upload("file-../../etc/passwd").is_none());
        assert!(Key::upload(&new_upload_id()).is_some());
        let job = JobId::new();
        assert!(Key::checkpoint_file(&job, 3, "optimizer.safetensors").is_none());
        assert!(Key::adapter_file(&job, "../x").is_none());
        assert_eq!(
            Key::checkpoint_file(&job, 3, "adapter_config.json")
                .unwrap()
                .as_str(),
            format!("jobs/{job}/output/checkpoint-3/adapter_config.json")
        );
    }
}
