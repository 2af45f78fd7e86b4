use std::path::PathBuf;

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
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("training diverged: loss is {0} at step {1}")]
    Diverged(f64, u64),
    #[error("cancelled")]
    Cancelled,
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A short machine-readable code for the service's job error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Spec(_) => "invalid_spec",
            Error::Model(_) => "model_error",
            Error::Tokenizer(_) => "tokenizer_error",
            Error::Data(_) => "dataset_error",
            Error::Checkpoint(_) => "checkpoint_error",
            Error::Io { .. } => "io_error",
            Error::Candle(_) => "internal_error",
            Error::Diverged(..) => "diverged",
            Error::Cancelled => "cancelled",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
