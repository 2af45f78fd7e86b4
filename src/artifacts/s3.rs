//! Artifacts in an S3-compatible object store (AWS S3, MinIO, …) through the `object_store`
//! crate: `--artifacts s3://bucket/prefix`. Credentials, region and endpoint come from the usual
//! `AWS_*` variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` or
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for another S3 API); plain http only with
//! `AWS_ALLOW_HTTP=true`. Every process reads and writes the same objects; each keeps its local
//! copies (what its engine reads and writes) under its own data dir.
//!
//! Writes go up as multipart uploads, which the store makes visible only once complete: a
//! reader never sees half an object; one that fails is aborted, the abort tried again in the
//! background until the store answers, so no orphaned parts are left behind. Reads are
//! streamed, ranges included.
//!
//! Outages: object_store retries each request (its defaults: 10 tries within 3 minutes, a
//! 30-second request timeout); above it, a whole file's upload or download is started over,
//! with backoff and jitter, for up to [`STORE_PATIENCE`], so a store that is down for minutes
//! or slow (seconds per request) delays a job instead of failing it. A client's upload streams
//! its request body and cannot be started over: it fails, and the client is told.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::stream::FuturesUnordered;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetRange, MultipartUpload, ObjectStore, ObjectStoreExt, UploadPart,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{hex, ArtifactStore, ByteStream, Key, PutError};
use crate::job::{FileDigest, JobId};

pub struct S3Artifacts {
    store: Arc<dyn ObjectStore>,
    /// Keys are stored under this prefix of the bucket ("" for the bucket's root).
    prefix: String,
    /// Where this process keeps its local copies.
    local: PathBuf,
}

/// Parts of a multipart upload held in memory at once: bounds an upload's memory.
const PARTS_IN_FLIGHT: usize = 2;

/// A part's size: S3's minimum for every part but the last.
const PART_BYTES: usize = 5 << 20;

/// How long a whole file's upload or download is started over through an outage.
const STORE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// How long a failed upload's abort is tried again (in the background) before its parts are
/// left to the bucket's lifecycle rules.
const ABORT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// One multipart upload: parts sent as the data comes, completed at the end, or aborted.
struct Upload {
    inner: Box<dyn MultipartUpload>,
    object: ObjectPath,
    pending: Vec<u8>,
    in_flight: FuturesUnordered<UploadPart>,
    parts: usize,
}

impl Upload {
    async fn start(store: &dyn ObjectStore, object: ObjectPath) -> std::io::Result<Upload> {
        let inner = store.put_multipart(&object).await.map_err(io)?;
        Ok(Upload {
            inner,
            object,
            pending: Vec::new(),
            in_flight: FuturesUnordered::new(),
            parts: 0,
        })
    }

    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.pending.extend_from_slice(data);
        while self.pending.len() >= PART_BYTES {
            let rest = self.pending.split_off(PART_BYTES);
            let part = std::mem::replace(&mut self.pending, rest);
            self.send(part).await?;
        }
        Ok(())
    }

    async fn send(&mut self, part: Vec<u8>) -> std::io::Result<()> {
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            if let Some(done) = self.in_flight.next().await {
                done.map_err(io)?;
            }
        }
        self.in_flight.push(self.inner.put_part(part.into()));
        self.parts += 1;
        Ok(())
    }

    async fn finish(&mut self) -> std::io::Result<()> {
        // the last part may be short; an empty object is one empty part
        if !self.pending.is_empty() || self.parts == 0 {
            let last = std::mem::take(&mut self.pending);
            self.send(last).await?;
        }
        while let Some(done) = self.in_flight.next().await {
            done.map_err(io)?;
        }
        self.inner.complete().await.map(|_| ()).map_err(io)
    }

    /// Aborts in the background, tried again until the store answers: the parts sent so far
    /// would otherwise stay in the bucket, unseen and billed.
    fn abort(mut self) {
        self.in_flight = FuturesUnordered::new(); // parts still in flight are cancelled
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut backoff = crate::retry::Backoff::new();
            loop {
                match self.inner.abort().await {
                    Ok(()) => return,
                    Err(e) if started.elapsed() < ABORT_PATIENCE => {
                        tracing::warn!(object = %self.object, error = %e, "aborting a failed upload failed; trying again");
                        backoff.wait().await;
                    }
                    Err(e) => {
                        tracing::error!(object = %self.object, error = %e, "gave up aborting a failed upload; its parts stay in the bucket");
                        return;
                    }
                }
            }
        });
    }
}

/// Runs `op` until it succeeds, fails for good (a missing object), or [`STORE_PATIENCE`] has
/// passed, waiting with backoff between tries.
async fn patiently<T, F, Fut>(what: &str, mut op: F) -> std::io::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let started = std::time::Instant::now();
    let mut backoff = crate::retry::Backoff::new();
    loop {
        match op().await {
            Err(e)
                if e.kind() != std::io::ErrorKind::NotFound
                    && started.elapsed() < STORE_PATIENCE =>
            {
                tracing::warn!(error = %e, "{what} failed; trying again");
                backoff.wait().await;
            }
            result => return result,
        }
    }
}

impl S3Artifacts {
    /// `s3://bucket[/prefix]`, configured from the environment; local copies under `local`.
    pub fn from_url(url: &str, local: &Path) -> anyhow::Result<S3Artifacts> {
        let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("--artifacts {url}: {e}"))?;
        anyhow::ensure!(
            parsed.scheme() == "s3",
            "--artifacts {url}: expected a local directory or s3://bucket/prefix"
        );
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| anyhow::anyhow!("--artifacts {url}: no bucket"))?;
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        // the name the AWS SDKs and CLI read for another S3 API
        if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
            builder = builder.with_endpoint(endpoint);
        }
        // from_env reads AWS_DEFAULT_REGION; AWS_REGION is what most tools set
        if let Ok(region) = std::env::var("AWS_REGION") {
            builder = builder.with_region(region);
        }
        let store = builder
            .build()
            .map_err(|e| anyhow::anyhow!("--artifacts {url}: {e}"))?;
        std::fs::create_dir_all(local)?;
        Ok(S3Artifacts {
            store: Arc::new(store),
            prefix: parsed.path().trim_matches('/').to_string(),
            local: local.to_path_buf(),
        })
    }

    fn object(&self, key: &Key) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key.as_str())
        } else {
            ObjectPath::from(format!("{}/{}", self.prefix, key.as_str()))
        }
    }

    /// Uploads a local file, streamed in parts; started over through an outage.
    async fn upload_file(&self, path: &Path, key: &Key) -> std::io::Result<()> {
        patiently(&format!("uploading {}", key.as_str()), || {
            self.upload_file_once(path, key)
        })
        .await
    }

    async fn upload_file_once(&self, path: &Path, key: &Key) -> std::io::Result<()> {
        let mut file = tokio::fs::File::open(path).await?;
        if file.metadata().await?.len() <= PART_BYTES as u64 {
            // one PUT: no multipart state in the bucket for a process killed mid-upload to leave
            let mut whole = Vec::new();
            file.read_to_end(&mut whole).await?;
            self.store
                .put(&self.object(key), whole.into())
                .await
                .map_err(io)?;
            return Ok(());
        }
        let mut upload = Upload::start(self.store.as_ref(), self.object(key)).await?;
        let mut buf = vec![0u8; 1 << 20];
        let sent = async {
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                upload.write(&buf[..n]).await?;
            }
            upload.finish().await
        }
        .await;
        if sent.is_err() {
            upload.abort();
        }
        sent
    }

    /// Downloads an object into a local file, atomically (a temporary file, then a rename);
    /// started over through an outage.
    async fn download(&self, key: &Key, dest: &Path) -> std::io::Result<bool> {
        patiently(&format!("downloading {}", key.as_str()), || {
            self.download_once(key, dest)
        })
        .await
    }

    async fn download_once(&self, key: &Key, dest: &Path) -> std::io::Result<bool> {
        let got = match self.store.get(&self.object(key)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(io(e)),
        };
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let tmp = dest.with_extension("download");
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut chunks = got.into_stream();
        while let Some(chunk) = chunks.next().await {
            file.write_all(&chunk.map_err(io)?).await?;
        }
        file.sync_all().await?;
        tokio::fs::rename(&tmp, dest).await?;
        Ok(true)
    }

    /// The keys stored under folder `key`.
    async fn list(&self, key: &Key) -> std::io::Result<Vec<Key>> {
        let prefix = self.object(key);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let found: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(io)?;
        Ok(found
            .into_iter()
            .filter_map(|meta| {
                let full = meta.location.to_string();
                full.strip_prefix(&strip).map(|k| Key(k.to_string()))
            })
            .collect())
    }
}

fn io(e: object_store::Error) -> std::io::Error {
    match e {
        object_store::Error::NotFound { .. } => {
            std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string())
        }
        e => std::io::Error::other(e.to_string()),
    }
}

impl ArtifactStore for S3Artifacts {
    fn put_stream<'a>(
        &'a self,
        key: &'a Key,
        mut body: BoxStream<'a, Result<Bytes, String>>,
        limit: u64,
    ) -> BoxFuture<'a, Result<FileDigest, PutError>> {
        Box::pin(async move {
            let mut upload = Upload::start(self.store.as_ref(), self.object(key)).await?;
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            let sent = async {
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(PutError::Body)?;
                    total += chunk.len() as u64;
                    if total > limit {
                        return Err(PutError::TooLarge { limit });
                    }
                    hasher.update(&chunk);
                    upload.write(&chunk).await?;
                }
                upload.finish().await?;
                Ok(())
            }
            .await;
            match sent {
                Ok(()) => Ok(FileDigest {
                    name: key.file_name().to_string(),
                    bytes: total,
                    sha256: hex(&hasher.finalize()),
                }),
                Err(e) => {
                    // nothing of a refused or broken upload is kept
                    upload.abort();
                    Err(e)
                }
            }
        })
    }

    fn size<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<Option<u64>>> {
        Box::pin(async move {
            match self.store.head(&self.object(key)).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(io(e)),
            }
        })
    }

    fn read<'a>(
        &'a self,
        key: &'a Key,
        range: Option<(u64, u64)>,
    ) -> BoxFuture<'a, std::io::Result<ByteStream>> {
        Box::pin(async move {
            let options = GetOptions {
                range: range.map(|(first, last)| GetRange::Bounded(first..last + 1)),
                ..Default::default()
            };
            let got = self
                .store
                .get_opts(&self.object(key), options)
                .await
                .map_err(io)?;
            Ok(got.into_stream().map_err(io).boxed())
        })
    }

    fn delete<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            match self.store.delete(&self.object(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(io(e)),
            }
            match tokio::fs::remove_file(self.local_path(key)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
    }

    fn delete_job<'a>(&'a self, job: &'a JobId) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let prefix = Key::job_prefix(job);
            for key in self.list(&prefix).await? {
                match self.store.delete(&self.object(&key)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(io(e)),
                }
            }
            match tokio::fs::remove_dir_all(self.local_path(&prefix)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
    }

    fn digest<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<FileDigest>> {
        Box::pin(async move {
            let mut chunks = self.read(key, None).await?;
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                total += chunk.len() as u64;
                hasher.update(&chunk);
            }
            Ok(FileDigest {
                name: key.file_name().to_string(),
                bytes: total,
                sha256: hex(&hasher.finalize()),
            })
        })
    }

    fn local_path(&self, key: &Key) -> PathBuf {
        self.local.join(key.as_str())
    }

    fn load<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<bool>> {
        Box::pin(async move {
            let local = self.local_path(key);
            // stored files never change once written: a complete local copy is current
            let what = format!("reading {}", key.as_str());
            let stored = patiently(&what, || self.size(key)).await?;
            if let (Ok(meta), Some(size)) = (tokio::fs::metadata(&local).await, stored) {
                if meta.len() == size {
                    return Ok(true);
                }
            }
            self.download(key, &local).await
        })
    }

    fn save<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move { self.upload_file(&self.local_path(key), key).await })
    }

    fn load_dir<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<bool>> {
        Box::pin(async move {
            let keys = patiently(&format!("listing {}", key.as_str()), || self.list(key)).await?;
            for k in &keys {
                self.load(k).await?;
            }
            Ok(!keys.is_empty())
        })
    }

    fn delete_dir<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            for file in self.list(key).await? {
                match self.store.delete(&self.object(&file)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(io(e)),
                }
            }
            match tokio::fs::remove_dir_all(self.local_path(key)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
    }

    fn save_dir<'a>(&'a self, key: &'a Key) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let mut entries = tokio::fs::read_dir(self.local_path(key)).await?;
            while let Some(entry) = entries.next_entry().await? {
                if entry.file_type().await?.is_file() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let file_key = Key(format!("{}/{name}", key.as_str()));
                    self.upload_file(&entry.path(), &file_key).await?;
                }
            }
            Ok(())
        })
    }
}
