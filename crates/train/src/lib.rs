//! Training τ-ResNets: full-batch gradient descent and SGD, run records, checkpoints,
//! and the commands of the `tau-resnet` CLI.

pub mod cmd;
pub mod config;
pub mod loss;
pub mod optim;
pub mod probe;
pub mod records;
pub mod schedule;
pub mod setup;
pub mod trainer;
