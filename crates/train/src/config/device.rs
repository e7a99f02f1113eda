//! The device and floating-point type of a run: `device = "cpu" | "cuda" | "cuda:N" |
//! "metal"` and `dtype`.

use std::fmt;
use std::str::FromStr;

use crate::error::Context;
use serde::{Deserialize, Serialize};

/// Floating-point type of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DTypeSpec {
    /// 32-bit floats.
    #[default]
    F32,
    /// 64-bit floats (slow; for numerical checks).
    F64,
}

impl DTypeSpec {
    /// The candle dtype.
    pub fn dtype(self) -> candle::DType {
        match self {
            DTypeSpec::F32 => candle::DType::F32,
            DTypeSpec::F64 => candle::DType::F64,
        }
    }
}

/// A device choice: `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first CUDA GPU when built with CUDA and one is present, else Metal, else CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA GPU number N.
    Cuda(usize),
    /// The Metal GPU.
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "metal" => Ok(DeviceSpec::Metal),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{s}`: expected auto, cpu, cuda, cuda:N or metal"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal => f.write_str("metal"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// Opens the device.
    ///
    /// # Errors
    /// When the device is absent or the binary was built without its feature.
    pub fn device(self) -> crate::Result<candle::Device> {
        match self {
            // candle's `*_is_available` say only whether the build has the feature: a
            // CUDA build on a machine without a usable GPU falls back to the CPU.
            DeviceSpec::Auto => Ok(candle::utils::cuda_is_available()
                .then(|| candle::Device::new_cuda(0).ok())
                .flatten()
                .or_else(|| {
                    candle::utils::metal_is_available()
                        .then(|| candle::Device::new_metal(0).ok())
                        .flatten()
                })
                .unwrap_or(candle::Device::Cpu)),
            DeviceSpec::Cpu => Ok(candle::Device::Cpu),
            DeviceSpec::Cuda(n) => candle::Device::new_cuda(n).with_context(|| {
                if cfg!(feature = "cuda") {
                    format!("opening cuda:{n} (no such GPU, or no usable NVIDIA driver)")
                } else {
                    format!(
                        "opening cuda:{n}: this binary is built without CUDA (build it with \
                         `--features cudnn` or `--features cuda`)"
                    )
                }
            }),
            DeviceSpec::Metal => candle::Device::new_metal(0).context(if cfg!(feature = "metal") {
                "opening metal (no usable Metal device)"
            } else {
                "opening metal: this binary is built without Metal (build it with `--features metal`)"
            }),
        }
    }
}
