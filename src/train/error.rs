use std::path::PathBuf;

/// An error another library raised, kept as the source of ours.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can stop a training run. Messages name the file, line or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid job spec: {0}")]
    Spec(#[from] crate::spec::SpecError),
    #[error("model: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("dataset: {0}")]
    Data(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("device: {0}")]
    Device(String),
    /// A failure of another library (a parser, the Hub client, the template engine), with what
    /// was being done; the library's error stays reachable as the source.
    #[error("{}: {context}: {source}", .area.as_str())]
    Caused {
        area: Area,
        context: String,
        #[source]
        source: BoxError,
    },
    /// A write ran out of disk: the path it was writing and what its filesystem had left.
    #[error("no space left on the device writing {}: {} free on that filesystem", path.display(), crate::disk::human(*free_bytes))]
    DiskFull { path: PathBuf, free_bytes: u64 },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The run stopped making sense; `reason` says what was seen and what to change.
    #[error("training diverged at step {step}: {reason}")]
    Diverged { step: u64, reason: String },
    #[error("cancelled")]
    Cancelled,
}

/// Which part of a run an [`Error::Caused`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    Model,
    Tokenizer,
    Checkpoint,
}

impl Area {
    fn as_str(self) -> &'static str {
        match self {
            Area::Model => "model",
            Area::Tokenizer => "tokenizer",
            Area::Checkpoint => "checkpoint",
        }
    }
}

impl Error {
    /// An I/O error at `path`; [`Error::DiskFull`] when the disk was full.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        let path = path.into();
        if crate::disk::is_full(&source) {
            return Error::Io {
                path: path.clone(),
                source,
            }
            .or_disk_full(&path);
        }
        Error::Io { path, source }
    }

    /// This error as [`Error::DiskFull`] at `path` when a full disk caused it, else itself.
    pub(crate) fn or_disk_full(self, path: &std::path::Path) -> Error {
        if matches!(self, Error::DiskFull { .. }) || !crate::disk::is_full(&self) {
            return self;
        }
        let free_bytes = path
            .ancestors()
            .find_map(|p| crate::disk::free_bytes(p).ok())
            .unwrap_or(0);
        Error::DiskFull {
            path: path.to_path_buf(),
            free_bytes,
        }
    }

    /// A library's error while doing `context` in `area`.
    pub(crate) fn caused(
        area: Area,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Error {
        Error::Caused {
            area,
            context: context.into(),
            source: source.into(),
        }
    }

    /// A short machine-readable code for the service's job error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Spec(_) => "invalid_spec",
            Error::Model(_)
            | Error::Caused {
                area: Area::Model, ..
            } => "model_error",
            Error::Tokenizer(_)
            | Error::Caused {
                area: Area::Tokenizer,
                ..
            } => "tokenizer_error",
            Error::Data(_) => "dataset_error",
            Error::Checkpoint(_)
            | Error::Caused {
                area: Area::Checkpoint,
                ..
            } => "checkpoint_error",
            Error::Device(_) => "device_error",
            Error::DiskFull { .. } => "disk_full",
            Error::Io { .. } => "io_error",
            Error::Candle(_) => "internal_error",
            Error::Diverged { .. } => "diverged",
            Error::Cancelled => "cancelled",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
