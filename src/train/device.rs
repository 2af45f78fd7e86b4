//! Device names as the CLI and the service take them: `cpu`, `cuda:0`, `cuda:1`, ...

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
