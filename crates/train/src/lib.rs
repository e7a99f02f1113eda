//! Training τ-ResNets: full-batch gradient descent and SGD, run records, checkpoints,
//! the stability probe; the library behind the `tau-resnet` CLI.

pub mod config;
pub mod error;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod probe;
pub mod records;
pub mod schedule;
pub mod setup;
pub mod trainer;

pub use error::{Error, Result};
