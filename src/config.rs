//! Process settings of `qtune serve`: every flag also from a `QTUNE_*` environment variable.
//! Training hyper-parameters are not here: they belong to each job's spec.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "QTUNE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Holds qtune.db (SQLite), uploaded files and every job's artifacts.
    #[arg(long, env = "QTUNE_DATA_DIR", default_value = "./qtune-data")]
    pub data_dir: PathBuf,
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
    /// Largest request body (job specs, uploads), in MiB.
    #[arg(long, env = "QTUNE_MAX_UPLOAD_MIB", default_value_t = 256)]
    pub max_upload_mib: u64,
    /// Largest dataset fetched from a URL, in MiB.
    #[arg(long, env = "QTUNE_MAX_DATASET_MIB", default_value_t = 1024)]
    pub max_dataset_mib: u64,
    /// Timeout of one dataset download attempt, in seconds.
    #[arg(long, env = "QTUNE_FETCH_TIMEOUT_SECS", default_value_t = 120)]
    pub fetch_timeout_secs: u64,
}

impl ServeConfig {
    /// A config for tests and embedding: everything default but the data dir.
    pub fn for_data_dir(data_dir: PathBuf) -> ServeConfig {
        ServeConfig {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            data_dir,
            devices: vec!["cpu".into()],
            api_keys: vec![],
            allow_file_dirs: vec![],
            max_upload_mib: 256,
            max_dataset_mib: 1024,
            fetch_timeout_secs: 120,
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("qtune.db")
    }
}
