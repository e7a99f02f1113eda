//! The error type of tau-train.
//!
//! Every fallible function of the library returns [`Result`]. An [`Error`] says what went
//! wrong in one line; its [`source`](std::error::Error::source) chain holds the causes (a
//! config key's problem inside "reading config FILE", an I/O error inside "writing
//! FILE"), so a binary shows the whole story with, for example, anyhow's `{:#}`.

use std::error::Error as StdError;

/// Either a value or an [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What failed in tau-train.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting, config file, checkpoint or input that cannot be used; the message names
    /// the key, the file or the value.
    #[error("{0}")]
    Invalid(String),
    /// What was being done when `source` failed.
    #[error("{context}")]
    Context {
        /// What was being done ("reading config FILE").
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn StdError + Send + Sync + 'static>,
    },
    /// A tensor or device operation.
    #[error(transparent)]
    Candle(#[from] candle::Error),
    /// Reading or checking a dataset.
    #[error(transparent)]
    Data(#[from] tau_data::DataError),
    /// Reading or writing a checkpoint's model files.
    #[error(transparent)]
    Checkpoint(#[from] tau_model::checkpoint::CheckpointError),
    /// Writing a record file.
    #[error(transparent)]
    Write(#[from] tau_records::WriteError),
    /// File-system I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Reading or writing JSON (run records, optimizer state).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Writing TOML (the resolved run config).
    #[error(transparent)]
    TomlWrite(#[from] toml::ser::Error),
}

impl Error {
    /// An [`Error::Invalid`] with this message.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::Invalid(message.into())
    }
}

/// Adds what was being done to an error, as anyhow's `Context` does, keeping the error as
/// the [`source`](std::error::Error::source) of an [`Error::Context`].
pub trait Context<T> {
    /// Wraps the error in `context`.
    ///
    /// # Errors
    /// The error, wrapped.
    fn context(self, context: impl std::fmt::Display) -> Result<T>;

    /// Wraps the error in the context `f` returns (called on error only).
    ///
    /// # Errors
    /// The error, wrapped.
    fn with_context<C: std::fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: StdError + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context.to_string(),
            source: Box::new(e),
        })
    }

    fn with_context<C: std::fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: f().to_string(),
            source: Box::new(e),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl std::fmt::Display) -> Result<T> {
        self.ok_or_else(|| Error::Invalid(context.to_string()))
    }

    fn with_context<C: std::fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::Invalid(f().to_string()))
    }
}

/// Returns early with an [`Error::Invalid`] whose message is formatted as `format!` does.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Invalid(format!($($arg)*)))
    };
}

/// Returns early with an [`Error::Invalid`] unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::error::bail!($($arg)*);
        }
    };
}

/// An [`Error::Invalid`] whose message is formatted as `format!` does.
macro_rules! err {
    ($($arg:tt)*) => {
        $crate::error::Error::Invalid(format!($($arg)*))
    };
}

pub(crate) use {bail, ensure, err};

#[cfg(test)]
mod tests {
    use super::*;

    /// The context is the message and the cause its source, as anyhow prints them.
    #[test]
    fn context_keeps_the_cause_as_source() {
        let io = std::fs::read("no/such/file").context("reading no/such/file");
        let err = io.unwrap_err();
        assert_eq!(err.to_string(), "reading no/such/file");
        let cause = err.source().unwrap();
        assert!(
            cause.downcast_ref::<std::io::Error>().is_some(),
            "{cause:?}"
        );
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.starts_with("reading no/such/file: "), "{chain}");
    }

    #[test]
    fn bail_and_ensure_give_invalid_errors() {
        fn check(n: usize) -> Result<usize> {
            ensure!(n > 0, "`n` must be positive, got {n}");
            if n > 9 {
                bail!("`n` must be at most 9, got {n}");
            }
            Ok(n)
        }
        assert!(matches!(check(0), Err(Error::Invalid(m)) if m == "`n` must be positive, got 0"));
        assert!(matches!(check(10), Err(Error::Invalid(m)) if m.contains("at most 9")));
        assert_eq!(check(3).unwrap(), 3);
        let none: Option<u8> = None;
        assert_eq!(
            none.context("missing x").unwrap_err().to_string(),
            "missing x"
        );
    }
}
