//! τ-ResNets in candle: the paper's theory network, CIFAR ResNets with and without
//! BatchNorm, and ImageNet bottleneck ResNets, each with its residual branch scaled by τ.

pub mod conv;
