//! Artifacts in an S3-compatible object store (AWS S3, MinIO, …) through the `object_store`
//! crate: `--artifacts s3://bucket/prefix`. Credentials, region and endpoint come from the usual
//! `AWS_*` variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` or
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for another S3 API); plain http only with
//! `AWS_ALLOW_HTTP=true`. Every process reads and writes the same objects; each keeps its local
//! copies (what its engine reads and writes) under its own data dir.
//!
//! Writes go up as multipart uploads, which the store makes visible only once complete: a
//! reader never sees half an object. Reads are streamed, ranges included.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
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

/// Parts of a multipart upload held in memory at once, each of object_store's default size
/// (5 MiB, the S3 minimum): bounds an upload's memory.
const PARTS_IN_FLIGHT: usize = 2;

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

    /// Uploads a local file, streamed in parts.
    async fn upload_file(&self, path: &Path, key: &Key) -> std::io::Result<()> {
        let mut file = tokio::fs::File::open(path).await?;
        let upload = self
            .store
            .put_multipart(&self.object(key))
            .await
            .map_err(io)?;
        let mut writer = WriteMultipart::new(upload);
        let mut buf = vec![0u8; 1 << 20];
        let sent = async {
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(io)?;
                writer.write(&buf[..n]);
            }
            std::io::Result::Ok(())
        }
        .await;
        match sent {
            Ok(()) => writer.finish().await.map(|_| ()).map_err(io),
            Err(e) => {
                writer.abort().await.ok();
                Err(e)
            }
        }
    }

    /// Downloads an object into a local file, atomically (a temporary file, then a rename).
    async fn download(&self, key: &Key, dest: &Path) -> std::io::Result<bool> {
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
            let upload = self
                .store
                .put_multipart(&self.object(key))
                .await
                .map_err(io)?;
            let mut writer = WriteMultipart::new(upload);
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
                    writer
                        .wait_for_capacity(PARTS_IN_FLIGHT)
                        .await
                        .map_err(io)?;
                    writer.put(chunk);
                }
                Ok(())
            }
            .await;
            match sent {
                Ok(()) => {
                    writer.finish().await.map_err(io)?;
                    Ok(FileDigest {
                        name: key.file_name().to_string(),
                        bytes: total,
                        sha256: hex(&hasher.finalize()),
                    })
                }
                Err(e) => {
                    // nothing of a refused or broken upload is kept
                    writer.abort().await.ok();
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
            if let (Ok(meta), Some(size)) =
                (tokio::fs::metadata(&local).await, self.size(key).await?)
            {
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
            let keys = self.list(key).await?;
            for k in &keys {
                self.load(k).await?;
            }
            Ok(!keys.is_empty())
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
