//! Device selection: `auto` prefers CUDA, then Metal, then the CPU.

use crate::{Error, Result};
use candle_core::Device;
use std::fmt;
use std::str::FromStr;

/// A device as the user names it on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA if compiled in and present, else Metal, else CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA GPU with this ordinal (`cuda` alone is 0).
    Cuda(usize),
    /// The first Metal GPU.
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "metal" | "mps" => Ok(Self::Metal),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Self::Cuda(ordinal)),
                _ => Err(Error::UnknownDevice(s.to_string())),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device, failing with a clear message when it is not compiled in or absent.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(device) = Device::new_cuda(0) {
                        return Ok(device);
                    }
                }
                if candle_core::utils::metal_is_available() {
                    if let Ok(device) = Device::new_metal(0) {
                        return Ok(device);
                    }
                }
                Ok(Device::Cpu)
            }
            Self::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(unavailable(
                        self,
                        "this build has no CUDA support; rebuild with `--features cuda`",
                    ));
                }
                Device::new_cuda(ordinal).map_err(|e| unavailable(self, &e.to_string()))
            }
            Self::Metal => {
                if !candle_core::utils::metal_is_available() {
                    return Err(unavailable(
                        self,
                        "this build has no Metal support; rebuild with `--features metal` on macOS",
                    ));
                }
                Device::new_metal(0).map_err(|e| unavailable(self, &e.to_string()))
            }
        }
    }
}

fn unavailable(spec: DeviceSpec, reason: &str) -> Error {
    Error::DeviceUnavailable {
        device: spec.to_string(),
        reason: reason.to_string(),
    }
}

/// A short human name for an opened device, as reported in stats and JSON.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_form() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal);
    }

    #[test]
    fn rejects_unknown_devices_with_the_accepted_forms() {
        for bad in ["tpu", "cuda:x", "cuda:", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("auto, cpu, cuda"), "{err}");
        }
    }

    #[test]
    fn cpu_always_opens_and_auto_falls_back() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        let auto = DeviceSpec::Auto.open().unwrap();
        if !candle_core::utils::cuda_is_available() && !candle_core::utils::metal_is_available() {
            assert!(auto.is_cpu());
        }
    }
}
