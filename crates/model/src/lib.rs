//! τ-ResNets in candle: the paper's theory network, CIFAR ResNets with and without
//! BatchNorm, and ImageNet bottleneck ResNets, each with its residual branch scaled by τ.

pub mod checkpoint;
pub mod config;
pub mod conv;
pub mod hub;
pub mod init;
pub mod model;
pub mod resnet;
pub mod tau;
pub mod theory;

pub use checkpoint::CheckpointError;
pub use config::{ModelConfig, ParamInit, ParamKind, ParamSpec};
pub use init::init_varmap;
pub use model::Model;
pub use resnet::{BottleneckResNet, BottleneckResNetConfig, CifarResNet, CifarResNetConfig, Norm};
pub use tau::{TauRule, TauRuleError};
pub use theory::{TheoryConfig, TheoryNet, TheoryTrace};
