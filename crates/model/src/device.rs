//! Where a model runs. `--device` takes `auto`, `cpu`, `cuda` or `cuda:N`;
//! `auto` picks the first GPU when r3 was built with the `cuda` feature and
//! one is present, and the CPU otherwise.
//!
//! Which kernels a decoder uses follows from its device: on the CPU, r3's
//! own (packed weights, split products, fused attention, the chunked
//! log-prob op); elsewhere candle's portable ops, which every backend has.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{ModelError, Result};

/// A device as the user names it, before it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first GPU if there is one (and r3 was built for it), else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("unknown device '{s}': expected auto, cpu, cuda or cuda:N");
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device. Asking for CUDA from a CPU-only build, or for a GPU
    /// that is not there, is an error that says which.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            // A CUDA build on a machine without a GPU (or driver) runs on
            // the CPU.
            Self::Auto if cfg!(feature = "cuda") => Ok(open_cuda(0).unwrap_or(Device::Cpu)),
            Self::Auto => Ok(Device::Cpu),
            Self::Cuda(_) if !cfg!(feature = "cuda") => Err(ModelError::Device(
                "this r3 was built without CUDA; build it with scripts/build-cuda.sh \
                 (cargo's --features cuda)"
                    .into(),
            )),
            Self::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

/// The type a decoder computes in, as `--dtype` names it: f32 (exact, the
/// default), or bf16 (half the memory and bandwidth; matrix products still
/// accumulate in f32), for inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("unknown dtype '{s}': expected f32 or bf16")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Both are written in configs and checkpoints as the flags spell them
/// (`"cuda:0"`, `"bf16"`), and read back through the same parser, so a
/// config file's `device = "gpu"` fails with the flag's own message.
macro_rules! serde_as_text {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_text!(DeviceChoice);
serde_as_text!(Precision);

fn open_cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal)
        .map_err(|e| ModelError::Device(format!("cannot open cuda:{ordinal}: {e}")))
}

/// The device's name as `--device` spells it: `cpu`, `cuda:0`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(choice));
            assert_eq!(choice.to_string(), text);
        }
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
        }
    }

    #[test]
    fn precisions_parse_and_print_back() {
        for (text, precision) in [("f32", Precision::F32), ("bf16", Precision::Bf16)] {
            assert_eq!(text.parse::<Precision>(), Ok(precision));
            assert_eq!(precision.to_string(), text);
        }
        let err = "fp16".parse::<Precision>().unwrap_err();
        assert!(err.contains("expected f32 or bf16"), "{err}");
    }

    #[test]
    fn cpu_is_always_there_and_auto_falls_back_to_it() {
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        if cfg!(not(feature = "cuda")) {
            assert!(DeviceChoice::Auto.open().unwrap().is_cpu());
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_from_a_cpu_build_says_how_to_get_one() {
        let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("built without CUDA"), "{err}");
        assert!(err.contains("scripts/build-cuda.sh"), "{err}");
    }
}
