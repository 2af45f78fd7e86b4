//! Process settings of `qtune serve` and `qtune worker` (one set, so that every process of a
//! deployment reads the same environment): every flag also from a `QTUNE_*` environment
//! variable. Training hyper-parameters are not here: they belong to each job's spec.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "QTUNE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Holds qtune.db (SQLite), uploaded files and every job's artifacts, unless --database and
    /// --artifacts put them elsewhere; a worker's scratch space (a job's files while it trains).
    #[arg(long, env = "QTUNE_DATA_DIR", default_value = "./qtune-data")]
    pub data_dir: PathBuf,
    /// The database: `sqlite://PATH` or `postgres://USER:PASSWORD@HOST:PORT/DB` (shared by every
    /// API and worker process). Default: qtune.db in the data dir.
    #[arg(long, env = "QTUNE_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
    /// Where uploads, fetched datasets, checkpoints and adapters are kept: a local directory, or
    /// `s3://bucket/prefix` (credentials, region and endpoint from the AWS_* variables). Default:
    /// the data dir. With S3 the data dir holds this process's local copies only.
    #[arg(long, env = "QTUNE_ARTIFACTS")]
    pub artifacts: Option<String>,
    /// Connections in this process's database pool.
    #[arg(long, env = "QTUNE_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: u32,
    /// Workers this process runs, one per device of --devices, in order (default: one for each);
    /// 0: none, the HTTP API only.
    #[arg(long, env = "QTUNE_WORKERS")]
    pub workers: Option<usize>,
    /// Seconds a worker's claim on a job lasts without renewal (renewed every third of it); a
    /// job whose worker died is taken over by another worker once it expires.
    #[arg(long, env = "QTUNE_LEASE_SECS", default_value_t = 30)]
    pub(crate) lease_secs: u64,
    /// Times a job may lose its worker (its lease expiring) and be taken over; one more and it
    /// fails with too_many_failovers.
    #[arg(long, env = "QTUNE_MAX_FAILOVERS", default_value_t = 3)]
    pub max_failovers: u32,
    /// Memory each worker may plan a job for, in MiB (default: its device's: the host's
    /// available memory on the CPU, the GPU's free memory on CUDA). A worker claims only jobs
    /// whose estimated peak fits what it has free.
    #[arg(long, env = "QTUNE_WORKER_MEMORY_MIB")]
    pub worker_memory_mib: Option<u64>,
    /// One worker per device, comma-separated: cpu, cuda:0, cuda:1, ...
    #[arg(
        long,
        env = "QTUNE_DEVICES",
        default_value = "cpu",
        value_delimiter = ','
    )]
    pub devices: Vec<String>,
    /// API keys, comma-separated; when set every /v1 route needs `Authorization: Bearer <key>`
    /// and a key sees only its own jobs and files.
    #[arg(
        long,
        env = "QTUNE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Directories from which `file://` dataset URLs and local paths may be read.
    #[arg(long, env = "QTUNE_ALLOW_FILE_DIRS", value_delimiter = ',')]
    pub allow_file_dirs: Vec<PathBuf>,
    /// Directories under which a job's base_model may be a local .gguf file or model folder.
    #[arg(long, env = "QTUNE_ALLOW_MODEL_DIRS", value_delimiter = ',')]
    pub allow_model_dirs: Vec<PathBuf>,
    /// The base models offered by name: `NAME=SOURCE` entries (SOURCE a model folder, a .gguf
    /// file or a Hub id), listed by `GET /v1/models` and usable wherever a base model is named
    /// (job specs, chat, completions, adapters); a fine-tune's `ft:` name carries NAME, not the
    /// source's path. NAME: 1 to 64 letters, digits, '.', '_', '-'.
    #[arg(long, env = "QTUNE_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// `models` parsed, once, when the service is assembled ([`ServeConfig::parse_catalogue`]).
    #[arg(skip)]
    catalogue: Vec<(String, String)>,
    /// Hub repos a job's base_model may name (`owner/name`, `owner/*`, or `*` for any); none
    /// listed: no Hub repo (local models only).
    #[arg(long, env = "QTUNE_ALLOW_HUB", value_delimiter = ',')]
    pub(crate) allow_hub: Vec<String>,
    /// Largest request body (job specs, uploads), in MiB.
    #[arg(long, env = "QTUNE_MAX_UPLOAD_MIB", default_value_t = 256)]
    pub max_upload_mib: u64,
    /// Largest dataset fetched from a URL, in MiB.
    #[arg(long, env = "QTUNE_MAX_DATASET_MIB", default_value_t = 1024)]
    pub max_dataset_mib: u64,
    /// Timeout of one dataset download attempt, in seconds.
    #[arg(long, env = "QTUNE_FETCH_TIMEOUT_SECS", default_value_t = 120)]
    pub fetch_timeout_secs: u64,
    /// Hosts, host:ports and address ranges (10.0.0.0/8) that dataset URLs may reach although
    /// they are not public, comma-separated. Everything else internal is refused.
    #[arg(long, env = "QTUNE_FETCH_ALLOW", value_delimiter = ',')]
    pub fetch_allow: Vec<String>,
    /// Host names (with or without port) the API answers to; by default a loopback listener
    /// answers only to its own address and `localhost`, any other listener to any name.
    #[arg(long, env = "QTUNE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub(crate) allowed_hosts: Vec<String>,
    /// Start without API keys although the data dir holds jobs or files that keys own
    /// (every caller then sees everything).
    #[arg(long, env = "QTUNE_ALLOW_KEYLESS")]
    pub allow_keyless: bool,
    /// Most optimizer steps one job may run (its epochs × steps per epoch, or its max_steps).
    #[arg(long, env = "QTUNE_MAX_JOB_STEPS", default_value_t = 1_000_000)]
    pub max_job_steps: u64,
    /// Longest one run of a job may train, in hours (fractions allowed); past it the job
    /// checkpoints and fails with time_limit_exceeded.
    #[arg(long, env = "QTUNE_MAX_JOB_HOURS", default_value_t = 72.0)]
    pub max_job_hours: f64,
    /// Jobs one API key may have queued at once; more are answered 429 (0: no limit).
    #[arg(long, env = "QTUNE_MAX_QUEUED_PER_KEY", default_value_t = 100)]
    pub max_queued_per_key: u64,
    /// Jobs of one API key that may run at once, over all workers (0: no limit).
    #[arg(long, env = "QTUNE_MAX_RUNNING_PER_KEY", default_value_t = 0)]
    pub max_running_per_key: u64,
    /// Bytes one API key may keep stored, in MiB: its uploads, its jobs' checkpoints and
    /// exports. Uploads, exports and new jobs past it are answered 429 (0: no limit).
    #[arg(long, env = "QTUNE_MAX_STORED_MIB_PER_KEY", default_value_t = 10240)]
    pub max_stored_mib_per_key: u64,
    /// Days a finished job's artifacts (checkpoints, adapter, fetched datasets) are kept; its
    /// record and loss curve stay (0: forever). Fractions allowed.
    #[arg(long, env = "QTUNE_RETENTION_DAYS", default_value_t = 0.0)]
    pub retention_days: f64,
    /// Uploads received at once; more are answered 429.
    #[arg(long, env = "QTUNE_MAX_CONCURRENT_UPLOADS", default_value_t = 8)]
    pub max_concurrent_uploads: usize,
    /// Exports made at once by this process (each reads and writes a whole model); one per API
    /// key. More are answered 429.
    #[arg(long, env = "QTUNE_MAX_CONCURRENT_EXPORTS", default_value_t = 2)]
    pub max_concurrent_exports: usize,
    /// Most connections open at once; more are closed as they arrive.
    #[arg(long, env = "QTUNE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers before its connection is closed.
    #[arg(long, env = "QTUNE_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Seconds a connection may sit with nothing moving on it while no request is being
    /// handled (a keep-alive connection, a response its client stopped reading) before it is
    /// closed.
    #[arg(long, env = "QTUNE_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Largest record (one line) of a dataset, in KiB: a longer one fails the job naming its line.
    #[arg(long, env = "QTUNE_MAX_RECORD_KIB", default_value_t = 1024)]
    pub(crate) max_record_kib: u64,
    /// Chat and completion requests a loaded base decodes together, in one continuous batch
    /// (whatever adapter each uses; others wait their turn, shared fairly between keys); the batch
    /// shares the CPU threads with training, so decoding slows a running job's steps while it
    /// lasts.
    #[arg(long, env = "QTUNE_MAX_CONCURRENT_GENERATIONS", default_value_t = 8)]
    pub max_concurrent_generations: usize,
    /// Memory for the key/value caches of the requests being decoded, in MiB, across all
    /// loaded bases: a request reserves its prompt's and its longest answer's share when it
    /// joins a batch and waits while that would pass the budget.
    #[arg(long, env = "QTUNE_KV_CACHE_MIB", default_value_t = 1024)]
    pub kv_cache_mib: u64,
    /// Chat and completion requests that may wait for a place in a batch; past it a request is
    /// answered 429 with Retry-After.
    #[arg(long, env = "QTUNE_MAX_WAITING_GENERATIONS", default_value_t = 64)]
    pub max_waiting_generations: usize,
    /// Base models kept loaded for chat (the least recently used is dropped past it).
    #[arg(long, env = "QTUNE_MAX_LOADED_BASES", default_value_t = 2)]
    pub(crate) max_loaded_bases: usize,
    /// Memory for fine-tuned adapters kept attached to their loaded base, in MiB (least
    /// recently used dropped first).
    #[arg(long, env = "QTUNE_ADAPTER_CACHE_MIB", default_value_t = 512)]
    pub adapter_cache_mib: u64,
    /// Free space the data dir's filesystem must keep, in MiB: below it the process reports
    /// itself not ready, its workers claim no job and uploads are answered 507, until space
    /// returns.
    #[arg(long, env = "QTUNE_MIN_FREE_DISK_MIB", default_value_t = 256)]
    pub min_free_disk_mib: u64,
}

/// 1 to 64 ASCII letters, digits, `.`, `_`, `-`, starting with a letter or digit: a name the
/// operator's catalogue or a tenant's uploaded adapter goes by, which no path (no `/`), Hub id
/// or fine-tuned model's name (no `:`) can be read as.
pub fn is_model_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl ServeConfig {
    /// A config for tests and embedding: everything default but the data dir.
    pub fn for_data_dir(data_dir: PathBuf) -> ServeConfig {
        ServeConfig {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            data_dir,
            database: None,
            artifacts: None,
            db_pool_size: 8,
            workers: None,
            lease_secs: 30,
            max_failovers: 3,
            worker_memory_mib: None,
            devices: vec!["cpu".into()],
            api_keys: vec![],
            allow_file_dirs: vec![],
            allow_model_dirs: vec![],
            allow_hub: vec![],
            models: vec![],
            catalogue: vec![],
            max_upload_mib: 256,
            max_dataset_mib: 1024,
            fetch_timeout_secs: 120,
            fetch_allow: vec![],
            allowed_hosts: vec![],
            allow_keyless: false,
            max_record_kib: 1024,
            max_queued_per_key: 100,
            max_running_per_key: 0,
            max_stored_mib_per_key: 10240,
            retention_days: 0.0,
            max_concurrent_uploads: 8,
            max_concurrent_exports: 2,
            max_connections: 1024,
            header_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_job_steps: 1_000_000,
            max_job_hours: 72.0,
            max_concurrent_generations: 8,
            kv_cache_mib: 1024,
            max_waiting_generations: 64,
            max_loaded_bases: 2,
            adapter_cache_mib: 512,
            min_free_disk_mib: 256,
        }
    }

    /// Reads `--models` into the catalogue the service consults; an error names the entry
    /// that is not `NAME=SOURCE` with a valid, unique name.
    pub(crate) fn parse_catalogue(&mut self) -> Result<(), String> {
        let mut out: Vec<(String, String)> = Vec::new();
        for entry in &self.models {
            let Some((name, source)) = entry.split_once('=') else {
                return Err(format!("--models entry {entry:?} is not NAME=SOURCE"));
            };
            let (name, source) = (name.trim(), source.trim());
            if !is_model_name(name) || source.is_empty() {
                return Err(format!(
                    "--models entry {entry:?}: NAME is 1 to 64 letters, digits, '.', '_', '-' \
                     and SOURCE a model folder, .gguf file or Hub id"
                ));
            }
            if out.iter().any(|(n, _)| n == name) {
                return Err(format!("--models names {name:?} twice"));
            }
            out.push((name.to_string(), source.to_string()));
        }
        self.catalogue = out;
        Ok(())
    }

    /// The `--models` catalogue as (name, source) pairs.
    pub fn catalogue(&self) -> &[(String, String)] {
        &self.catalogue
    }

    /// What `model` names: a catalogue entry's source, or `model` itself.
    pub fn model_source(&self, model: &str) -> String {
        self.catalogue
            .iter()
            .find(|(n, _)| n == model)
            .map_or_else(|| model.to_string(), |(_, source)| source.clone())
    }

    /// `spec` as the engine runs it: its base model a catalogue name's source.
    pub fn resolved(&self, spec: &crate::spec::JobSpec) -> crate::spec::JobSpec {
        let mut spec = spec.clone();
        spec.base_model = self.model_source(&spec.base_model);
        spec
    }

    /// The database URL: --database, or the SQLite file in the data dir.
    pub(crate) fn database_url(&self) -> String {
        match &self.database {
            Some(url) if !url.trim().is_empty() => url.trim().to_string(),
            _ => format!("sqlite://{}", self.data_dir.join("qtune.db").display()),
        }
    }

    /// The devices this process runs workers on.
    pub(crate) fn worker_devices(&self) -> &[String] {
        let n = self
            .workers
            .unwrap_or(self.devices.len())
            .min(self.devices.len());
        &self.devices[..n]
    }
}
