//! Safetensors files: atomic writes, and reads that check each tensor's dtype, shape and
//! values and name the tensor and the file when something is wrong.
//!
//! Checkpoints, batch files, parameter files and gradient files all go through here.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors, View};
use serde::de::DeserializeOwned;

use crate::io::finite::first_non_finite;

// Safetensors stores little-endian values; tensors are written straight from memory.
#[cfg(target_endian = "big")]
compile_error!("lomar writes safetensors files from memory and needs a little-endian target");

/// One tensor to write, borrowing its values.
pub struct OutTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: OutValues<'a>,
}

pub enum OutValues<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

impl<'a> OutTensor<'a> {
    pub fn f32(name: impl Into<String>, shape: &[usize], values: &'a [f32]) -> Self {
        OutTensor {
            name: name.into(),
            shape: shape.to_vec(),
            values: OutValues::F32(values),
        }
    }
    pub fn i64(name: impl Into<String>, shape: &[usize], values: &'a [i64]) -> Self {
        OutTensor {
            name: name.into(),
            shape: shape.to_vec(),
            values: OutValues::I64(values),
        }
    }
}

impl View for &OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self.values {
            OutValues::F32(_) => Dtype::F32,
            OutValues::I64(_) => Dtype::I64,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.values {
            OutValues::F32(v) => Cow::Borrowed(bytemuck::cast_slice(v)),
            OutValues::I64(v) => Cow::Borrowed(bytemuck::cast_slice(v)),
        }
    }
    fn data_len(&self) -> usize {
        match self.values {
            OutValues::F32(v) => 4 * v.len(),
            OutValues::I64(v) => 8 * v.len(),
        }
    }
}

/// Writes the tensors to `<path>.tmp`, syncs it to disk and renames it over `path`, so a
/// crash leaves either the old file or the new one, never half of one.
pub fn write_atomic(
    path: &Path,
    tensors: &[OutTensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<()> {
    for t in tensors {
        let want: usize = t.shape.iter().product();
        let have = (&t).data_len() / (&t).dtype().size();
        if want != have {
            bail!(
                "internal: tensor {} has {have} values for shape {:?}",
                t.name,
                t.shape
            );
        }
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = write_synced(&tmp, tensors, metadata).and_then(|()| {
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    });
    if written.is_err() {
        // Best effort: the error that matters is the one being returned.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_parent_dir(path);
    Ok(())
}

fn write_synced(
    tmp: &Path,
    tensors: &[OutTensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views = tensors.iter().map(|t| (t.name.as_str(), t));
    safetensors::serialize_to_file(views, &Some(metadata), tmp)
        .map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))?;
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {} to disk", tmp.display()))
}

/// Makes the rename itself durable. Not every platform can open a directory, so this is
/// best effort.
fn sync_parent_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A safetensors file read into memory, its header parsed and checked.
pub struct TensorFile {
    path: PathBuf,
    bytes: Vec<u8>,
    data_start: usize,
    header: Metadata,
}

impl TensorFile {
    /// `what` says what the file is for, e.g. "checkpoint" or "batch file".
    pub fn open(path: &Path, what: &str) -> Result<Self> {
        let bytes =
            fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
        let (header_len, header) = SafeTensors::read_metadata(&bytes).map_err(|e| {
            anyhow!(
                "{what} {} is not a valid safetensors file ({e:?})",
                path.display()
            )
        })?;
        Ok(TensorFile {
            path: path.to_path_buf(),
            bytes,
            data_start: 8 + header_len,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A string from the file's `__metadata__`, if present.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(key))
            .map(String::as_str)
    }

    /// The JSON value of a `__metadata__` entry, `None` when the entry is absent; an entry
    /// that does not parse is an error naming the file and the key. Every reader of config,
    /// step, sampler and data state goes through here.
    pub fn metadata_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.metadata(key)
            .map(|text| {
                serde_json::from_str(text).map_err(|e| {
                    anyhow!(
                        "{}: metadata `{key}` is malformed ({e})",
                        self.path.display()
                    )
                })
            })
            .transpose()
    }

    /// Like [`Self::metadata_json`], for an entry the file must have.
    pub fn required_json<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.metadata_json(key)?
            .ok_or_else(|| anyhow!("{}: metadata has no `{key}` entry", self.path.display()))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.header.info(name).is_some()
    }

    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.header
            .info(name)
            .ok_or_else(|| anyhow!("{}: no tensor named `{name}`", self.path.display()))
    }

    fn bytes_of(&self, info: &TensorInfo) -> &[u8] {
        let (s, e) = info.data_offsets;
        &self.bytes[self.data_start + s..self.data_start + e]
    }

    /// An F32 tensor that must have exactly `shape`.
    pub fn f32_exact(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (have, values) = self.f32(name)?;
        if have != shape {
            bail!(
                "{}: tensor `{name}` has shape {have:?}, want {shape:?}",
                self.path.display()
            );
        }
        Ok(values)
    }

    /// An F32 tensor of any shape, with its shape; every value must be finite.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.info(name)?;
        if info.dtype != Dtype::F32 {
            bail!(
                "{}: tensor `{name}` has dtype {:?}, want F32",
                self.path.display(),
                info.dtype
            );
        }
        let values: Vec<f32> = self
            .bytes_of(info)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // lomar never writes a NaN or an infinity, so one means a damaged or foreign file.
        if let Some(i) = first_non_finite(&values) {
            bail!(
                "{}: tensor `{name}`: value {i} is not finite ({})",
                self.path.display(),
                values[i]
            );
        }
        Ok((info.shape.clone(), values))
    }

    /// An integer tensor (I32, I64 or U32) as `u32`, refusing values that do not fit.
    pub fn indices(&self, name: &str) -> Result<(Vec<usize>, Vec<u32>)> {
        let info = self.info(name)?;
        let bytes = self.bytes_of(info);
        let wide: Vec<i64> = match info.dtype {
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            Dtype::U32 => bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            other => bail!(
                "{}: tensor `{name}` has dtype {other:?}, want an integer dtype (I32, I64 or U32)",
                self.path.display()
            ),
        };
        let values = wide
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                u32::try_from(v).map_err(|_| {
                    anyhow!(
                        "{}: tensor `{name}` holds {v} at flat index {i}; indices must be >= 0",
                        self.path.display()
                    )
                })
            })
            .collect::<Result<_>>()?;
        Ok((info.shape.clone(), values))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_values_shapes_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = [1.5f32, -2.0, 3.25, f32::MIN_POSITIVE, 0.0, 7.0];
        let b = [-3i64, 0, 9];
        let c = [0.0f32, 1.0, f32::NAN, f32::INFINITY];
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        write_atomic(
            &path,
            &[
                OutTensor::f32("a", &[2, 3], &a),
                OutTensor::i64("b", &[3], &b),
                OutTensor::f32("c", &[4], &c),
            ],
            meta,
        )
        .unwrap();
        assert!(!dir.path().join("t.safetensors.tmp").exists());
        let f = TensorFile::open(&path, "test file").unwrap();
        assert_eq!(f.metadata("k"), Some("v"));
        assert_eq!(f.f32_exact("a", &[2, 3]).unwrap(), a);
        let err = f.indices("b").unwrap_err().to_string();
        assert!(err.contains("`b` holds -3"), "{err}");
        let err = f.f32_exact("a", &[3, 2]).unwrap_err().to_string();
        assert!(err.contains("`a` has shape [2, 3], want [3, 2]"), "{err}");
        let err = f.f32("b").unwrap_err().to_string();
        assert!(err.contains("`b` has dtype I64, want F32"), "{err}");
        let err = f.f32("c").unwrap_err().to_string();
        assert!(
            err.contains("tensor `c`: value 2 is not finite (NaN)"),
            "{err}"
        );
        let err = f.f32("d").unwrap_err().to_string();
        assert!(err.contains("no tensor named `d`"), "{err}");
    }

    #[test]
    fn garbage_is_not_a_safetensors_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        fs::write(&path, b"definitely not tensors").unwrap();
        let err = TensorFile::open(&path, "batch file").err().unwrap();
        assert!(
            err.to_string().contains("is not a valid safetensors file"),
            "{err}"
        );
        let err = TensorFile::open(&dir.path().join("absent"), "batch file")
            .err()
            .unwrap();
        assert!(
            err.to_string().starts_with("cannot read batch file"),
            "{err}"
        );
    }
}
