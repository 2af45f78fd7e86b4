//! The data dir's disk: how much room is left, and whether a failed write ran out of it. A
//! process whose disk is (nearly) full says so — not ready, no new job claimed, uploads answered
//! 507 — and a job that filled it fails with `disk_full` naming the path and the space left,
//! instead of an anonymous I/O error.

use std::path::Path;

/// Bytes free to an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The free space on the data dir's filesystem when it is below the operator's minimum
/// (`--min-free-disk-mib`), else `None`.
pub fn short_of_space(config: &crate::config::ServeConfig) -> Option<u64> {
    let free = free_bytes(&config.data_dir).ok()?;
    (free < config.min_free_disk_mib << 20).then_some(free)
}

/// Whether `e`, or an error it was caused by, is "no space left on device" (or over a quota).
pub fn is_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
                || io.kind() == std::io::ErrorKind::StorageFull
            {
                return true;
            }
        }
        cur = err.source();
    }
    // libraries that keep only the text of the I/O error they met
    e.to_string()
        .contains(&format!("(os error {})", libc::ENOSPC))
}

/// "N MiB" (or bytes, below one), for messages.
pub fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_recognised_through_wrappers() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(is_full(&io));
        let wrapped = candle_core::Error::from(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(is_full(&wrapped));
        assert!(!is_full(&std::io::Error::from_raw_os_error(libc::EACCES)));
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
    }
}
