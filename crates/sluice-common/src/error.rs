//! One error type for the whole engine, split by whose fault it is.

use std::fmt;
use std::path::PathBuf;

use datafusion::error::DataFusionError;

/// `Result` with Sluice's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Sluice.
///
/// The variant says whose fault it is, which decides what the engine does:
/// a [`Error::Plan`] or [`Error::Data`] error stops the query at once, an
/// [`Error::Io`] error is transient and may be retried with the same offsets.
#[derive(Debug)]
pub enum Error {
    /// The user's query, statement or option is invalid.
    Plan(String),
    /// A valid query that this version of Sluice does not support yet.
    NotSupported(String),
    /// Input data that cannot be decoded (bad JSON, wrong type, truncated file).
    Data(String),
    /// A checkpoint file is missing, corrupt, truncated or locked by another process.
    Checkpoint {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An I/O error, with what was being done.
    Io {
        /// What was being done, e.g. "writing sources/clicks/files/0".
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An error raised inside DataFusion.
    DataFusion(DataFusionError),
    /// A bug in Sluice: an invariant did not hold.
    Internal(String),
    /// An error with context added as it travelled up.
    Context {
        /// Where the error happened, e.g. "batch 4 of sink 'out'".
        context: String,
        /// The error itself.
        source: Box<Error>,
    },
}

impl Error {
    /// A [`Error::Plan`] error.
    pub fn plan(msg: impl Into<String>) -> Self {
        Error::Plan(msg.into())
    }

    /// A [`Error::NotSupported`] error.
    pub fn not_supported(msg: impl Into<String>) -> Self {
        Error::NotSupported(msg.into())
    }

    /// A [`Error::Data`] error.
    pub fn data(msg: impl Into<String>) -> Self {
        Error::Data(msg.into())
    }

    /// A [`Error::Internal`] error.
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }

    /// A [`Error::Checkpoint`] error for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Io`] error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps this error with more context.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// The innermost error, past every [`Error::Context`].
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            other => other,
        }
    }

    /// Whether retrying the same batch with the same offsets may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.root(),
            Error::Io { .. }
                | Error::DataFusion(DataFusionError::IoError(_))
                | Error::DataFusion(DataFusionError::ObjectStore(_))
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Plan(m) => write!(f, "planning error: {m}"),
            Error::NotSupported(m) => write!(f, "not supported yet: {m}"),
            Error::Data(m) => write!(f, "bad input: {m}"),
            Error::Checkpoint { path, reason } => {
                write!(f, "checkpoint error at {}: {reason}", path.display())
            }
            Error::Io { context, source } => write!(f, "I/O error while {context}: {source}"),
            Error::DataFusion(e) => write!(f, "{}", strip_datafusion(e)),
            Error::Internal(m) => write!(f, "internal error (a bug in Sluice): {m}"),
            Error::Context { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

/// DataFusion wraps errors in context layers and appends backtrace hints;
/// users want the message.
fn strip_datafusion(e: &DataFusionError) -> String {
    let s = e.find_root().to_string();
    s.lines().next().unwrap_or_default().to_string()
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::DataFusion(e) => Some(e),
            Error::Context { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        // A Sluice error that crossed a DataFusion boundary (e.g. raised by a
        // source inside a scan) comes back as itself.
        if let DataFusionError::External(inner) = &e
            && inner.is::<Error>()
        {
            if let DataFusionError::External(inner) = e {
                return *inner.downcast::<Error>().expect("checked by is()");
            }
            unreachable!()
        }
        match e {
            DataFusionError::Plan(m) | DataFusionError::SQL(_, Some(m)) => Error::Plan(m),
            DataFusionError::NotImplemented(m) => Error::NotSupported(m),
            other => Error::DataFusion(other),
        }
    }
}

impl From<Error> for DataFusionError {
    fn from(e: Error) -> Self {
        DataFusionError::External(Box::new(e))
    }
}

impl From<datafusion::arrow::error::ArrowError> for Error {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        Error::DataFusion(DataFusionError::ArrowError(Box::new(e), None))
    }
}

/// Adds context to a `Result`'s error.
pub trait ResultExt<T> {
    /// Wraps the error, if any, with `context`.
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| e.into().context(context()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sluice_error_survives_a_datafusion_round_trip() {
        let e: DataFusionError = Error::data("line 3: bad").into();
        let back: Error = e.into();
        assert!(matches!(back, Error::Data(ref m) if m == "line 3: bad"));
    }

    #[test]
    fn io_errors_are_transient_and_data_errors_are_not() {
        let io = Error::io("reading", std::io::Error::other("x")).context("batch 1");
        assert!(io.is_transient());
        assert!(!Error::data("x").context("batch 1").is_transient());
        assert_eq!(
            Error::data("x").context("batch 1").to_string(),
            "batch 1: bad input: x"
        );
    }
}
