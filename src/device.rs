//! Where tensors live: the CPU or one CUDA GPU, named as users name them (`cpu`, `cuda`,
//! `cuda:1`, or a bare GPU ordinal `1` in device lists). A device is chosen at the edge (a CLI
//! flag, an executor's settings, a training config) and passed down; asking for a GPU on a build
//! or a host without CUDA is an error that says which, never a silent fall back to the CPU.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: use cpu, cuda, cuda:N, or a GPU number")]
    Unknown(String),
    #[error("{0} was asked for, but this ferrotune was built without CUDA support (build it with `--features cuda`)")]
    NotCompiled(DeviceSpec),
    #[error("{0} is not usable on this host: {1}")]
    Unavailable(DeviceSpec, String),
}

impl DeviceSpec {
    pub fn is_cuda(self) -> bool {
        matches!(self, Self::Cuda(_))
    }

    /// Opens the device, or says why it cannot be used here.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(_) if !cfg!(feature = "cuda") => Err(DeviceError::NotCompiled(self)),
            Self::Cuda(ordinal) => Device::new_cuda(ordinal).map_err(|e| DeviceError::Unavailable(self, e.to_string())),
        }
    }

    /// A list such as `0,1` (GPU ordinals), `cuda:0,cuda:1` or `cpu`.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, DeviceError> {
        text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(Self::parse_listed).collect()
    }

    /// In a device list a bare number is a GPU.
    fn parse_listed(text: &str) -> Result<Self, DeviceError> {
        match text.parse::<usize>() {
            Ok(ordinal) => Ok(Self::Cuda(ordinal)),
            Err(_) => text.parse(),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower = text.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => lower
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Unknown(text.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_as_users_write_them() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::parse_list("0, 1").unwrap(), vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]);
        assert_eq!(DeviceSpec::parse_list("cpu,cuda:2").unwrap(), vec![DeviceSpec::Cpu, DeviceSpec::Cuda(2)]);
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn a_gpu_on_a_build_without_cuda_is_a_clear_error() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("without CUDA support") && err.contains("--features cuda"), "{err}");
        }
    }
}
