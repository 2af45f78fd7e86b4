//! Device names as the CLI and the service take them (`cpu`, `cuda:0`, `cuda:1`, ...), and how
//! much memory a device has.

use candle_core::Device;

use super::{Error, Result};

pub fn parse(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(i) = name.strip_prefix("cuda:") {
        let ordinal: usize = i
            .parse()
            .map_err(|_| Error::Device(format!("bad device {name:?} (expected cuda:N)")))?;
        return Ok(Device::new_cuda(ordinal)?);
    }
    Err(Error::Device(format!(
        "unknown device {name:?} (expected cpu or cuda:N)"
    )))
}

/// A device's memory, in bytes: all of it, and what a new job could use now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub(crate) total: u64,
    pub free: u64,
}

/// The memory of `device`: on the CPU the host's (`MemTotal`, `MemAvailable`), on CUDA the
/// driver's figures for the GPU.
pub fn memory(device: &Device) -> Result<DeviceMemory> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let (free, total) = cuda
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(|e| Error::Device(format!("reading the GPU's memory: {e}")))?;
            Ok(DeviceMemory {
                total: total as u64,
                free: free as u64,
            })
        }
        _ => {
            let info = std::fs::read_to_string("/proc/meminfo")
                .map_err(|e| Error::Device(format!("reading /proc/meminfo: {e}")))?;
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|rest| rest.trim().strip_suffix("kB"))
                    .and_then(|kb| kb.trim().parse::<u64>().ok())
                    .map(|kb| kb * 1024)
                    .ok_or_else(|| Error::Device(format!("/proc/meminfo has no {name}")))
            };
            Ok(DeviceMemory {
                total: field("MemTotal:")?,
                free: field("MemAvailable:")?,
            })
        }
    }
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes; 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
