//! Weights from Hugging Face safetensors files (one file, or shards with an index), read a
//! tensor at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::WeightSource;
use crate::train::error::{Area, Error, Result};

/// The safetensors files of a folder: one `model.safetensors`, or the shards its index lists.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| {
        Error::Model(format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        ))
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::caused(Area::Model, index.display().to_string(), e))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Model(format!("{}: no weight_map", index.display())))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// The tensors of a checkpoint's safetensors files, each read from disk when it is taken (a
/// positioned read of its bytes, nothing mapped): only the tensor being converted or quantized
/// is in memory besides the model built so far, so a base quantized on load never holds the
/// float32 file (a mapped file's pages count as the process's memory until it is unmapped).
pub(crate) struct SafetensorsSource {
    files: Vec<(PathBuf, std::fs::File)>,
    /// name → (file index, byte offset of the tensor's data in the file, its header entry)
    tensors: HashMap<String, (usize, u64, safetensors::tensor::TensorInfo)>,
}

impl SafetensorsSource {
    pub(crate) fn open(paths: &[PathBuf]) -> Result<SafetensorsSource> {
        use std::os::unix::fs::FileExt;
        let mut source = SafetensorsSource {
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        for (index, path) in paths.iter().enumerate() {
            let bad = |what: String| Error::Model(format!("{}: {what}", path.display()));
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
            let mut len = [0u8; 8];
            file.read_exact_at(&mut len, 0)
                .map_err(|_| bad("not a safetensors file (no header length)".into()))?;
            let header_len = u64::from_le_bytes(len);
            // the format caps the header at 100 MB
            if header_len > 100_000_000 || 8 + header_len > file_len {
                return Err(bad(format!("header length {header_len} is not plausible")));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact_at(&mut header, 8)
                .map_err(|e| Error::io(path, e))?;
            let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
                .map_err(|e| bad(format!("safetensors header: {e}")))?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                // checked: a hostile header may name shapes whose product overflows
                let bits = info
                    .shape
                    .iter()
                    .try_fold(info.dtype.bitsize(), |n, &d| n.checked_mul(d));
                if end < start
                    || data_start.saturating_add(end as u64) > file_len
                    || bits != (end - start).checked_mul(8)
                {
                    return Err(bad(format!(
                        "tensor {name}: offsets {start}..{end} do not hold its shape {:?} in \
                         the file's {file_len} bytes",
                        info.shape
                    )));
                }
                source
                    .tensors
                    .insert(name, (index, data_start + start as u64, info.clone()));
            }
            source.files.push((path.clone(), file));
        }
        Ok(source)
    }
}

impl WeightSource for SafetensorsSource {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        use safetensors::Dtype as St;
        use std::os::unix::fs::FileExt;
        let Some((index, offset, info)) = self.tensors.remove(name) else {
            return Ok(None);
        };
        let dtype = match info.dtype {
            St::F32 => DType::F32,
            St::F16 => DType::F16,
            St::BF16 => DType::BF16,
            St::F64 => DType::F64,
            other => {
                return Err(Error::Model(format!(
                    "tensor {name}: dtype {other:?} is not a float type"
                )))
            }
        };
        let (path, file) = &self.files[index];
        let mut bytes = vec![0u8; info.data_offsets.1 - info.data_offsets.0];
        file.read_exact_at(&mut bytes, offset)
            .map_err(|e| Error::io(path, e))?;
        Ok(Some(Tensor::from_raw_buffer(
            &bytes,
            dtype,
            &info.shape,
            &Device::Cpu,
        )?))
    }
}
