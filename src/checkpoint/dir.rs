//! A Hugging Face checkpoint directory: `config.json`, and `model.safetensors` or shards listed
//! by `model.safetensors.index.json`. Opening reads config.json and the shard headers only;
//! [`CheckpointDir::fetch`] memory-maps each shard that holds a requested tensor, copies those
//! tensors out and unmaps it, so a layer costs its own bytes whatever the checkpoint's size.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorInfo};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Where one tensor lives: its shard, dtype, shape and byte range in that shard.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The shard's file name inside the directory.
    pub file: String,
    /// As the header states it.
    pub dtype: Dtype,
    /// As the header states it.
    pub shape: Vec<usize>,
    /// Byte range in the shard file (header included in the offset).
    start: usize,
    end: usize,
}

/// A tensor read out of a shard: its bytes as stored.
#[derive(Debug, Clone)]
pub struct Raw {
    /// The tensor's name in the checkpoint.
    pub name: String,
    /// The shard it came from (for errors).
    pub file: String,
    /// As stored.
    pub dtype: Dtype,
    /// As stored.
    pub shape: Vec<usize>,
    /// Little-endian element bytes as stored.
    pub bytes: Vec<u8>,
}

/// An opened checkpoint directory.
#[derive(Debug)]
pub struct CheckpointDir {
    /// The directory.
    pub dir: PathBuf,
    /// `config.json` as parsed.
    pub config: serde_json::Map<String, serde_json::Value>,
    entries: BTreeMap<String, Entry>,
}

const CONFIG: &str = "config.json";
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

impl CheckpointDir {
    /// Reads `config.json`, the shard index (if any) and every shard's header.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG);
        if !dir.is_dir() {
            return Err(err(dir, "not a directory"));
        }
        let text = read_text(&config_path)?;
        let config = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(other) => return Err(err(&config_path, format!("not a JSON object: {other}"))),
            Err(e) => return Err(err(&config_path, format!("not valid JSON: {e}"))),
        };
        let files = shard_files(dir)?;
        let mut entries = BTreeMap::new();
        for (file, listed) in &files {
            let path = dir.join(file);
            for (name, entry) in read_header(&path, file)? {
                if let Some(listed) = listed {
                    // The index says which shard holds a tensor; a copy elsewhere is ignored.
                    if !listed.contains(&name) {
                        continue;
                    }
                }
                entries.insert(name, entry);
            }
        }
        // Every tensor the index lists must be in the shard it names.
        for (file, listed) in &files {
            if let Some(listed) = listed {
                if let Some(missing) = listed.iter().find(|n| !entries.contains_key(*n)) {
                    return Err(err(
                        &dir.join(file),
                        format!("tensor {missing:?} is listed in {INDEX} but not in this shard"),
                    ));
                }
            }
        }
        Ok(CheckpointDir {
            dir: dir.to_path_buf(),
            config,
            entries,
        })
    }

    /// A checkpoint of which only config.json is known (no shards): what reading a layer's
    /// family, routing and tensor names needs when the tensors come from elsewhere (a candle
    /// `VarBuilder`). `dir` is where errors say config.json is.
    #[cfg(feature = "candle")]
    pub(crate) fn from_config(
        dir: PathBuf,
        config: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        CheckpointDir {
            dir,
            config,
            entries: BTreeMap::new(),
        }
    }

    /// The directory as errors show it.
    pub fn origin(&self) -> String {
        self.dir.display().to_string()
    }

    /// The entry of a tensor, if the checkpoint has it.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// Whether the checkpoint has a tensor of that name.
    pub fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Every tensor name starting with `prefix`.
    pub fn names_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .range(prefix.to_string()..)
            .map(|(k, _)| k.as_str())
            .take_while(move |k| k.starts_with(prefix))
    }

    /// An error about the checkpoint as a whole (config.json, layers).
    pub fn error(&self, what: impl Into<String>) -> Error {
        err(&self.dir.join(CONFIG), what)
    }

    /// An error about one tensor, naming its shard.
    pub fn tensor_error(&self, name: &str, what: impl std::fmt::Display) -> Error {
        let file = self
            .entries
            .get(name)
            .map(|e| self.dir.join(&e.file))
            .unwrap_or_else(|| self.dir.clone());
        err(&file, format!("tensor {name:?}: {what}"))
    }

    /// Reads the named tensors (each shard mapped once, then unmapped). A name the checkpoint
    /// lacks is an error naming it.
    pub fn fetch(&self, names: &[String]) -> Result<BTreeMap<String, Raw>> {
        let mut by_file: BTreeMap<&str, Vec<(&str, &Entry)>> = BTreeMap::new();
        for name in names {
            let entry = self.entries.get(name).ok_or_else(|| {
                err(
                    &self.dir,
                    format!("missing tensor {name:?} (no shard of the checkpoint holds it)"),
                )
            })?;
            by_file
                .entry(entry.file.as_str())
                .or_default()
                .push((name, entry));
        }
        let mut out = BTreeMap::new();
        for (file, wanted) in by_file {
            let path = self.dir.join(file);
            let handle = File::open(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the map is read-only and lives only inside this loop iteration; every
            // range read from it was checked against its length below. A checkpoint rewritten
            // by another process while we read it is outside what any mmap loader can guard
            // (safetensors' own loaders make the same assumption).
            let map = unsafe { memmap2::Mmap::map(&handle) }.map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            for (name, e) in wanted {
                let bytes = map.get(e.start..e.end).ok_or_else(|| {
                    err(
                        &path,
                        format!("tensor {name:?}: byte range past the end of the file"),
                    )
                })?;
                out.insert(
                    name.to_string(),
                    Raw {
                        name: name.to_string(),
                        file: file.to_string(),
                        dtype: e.dtype,
                        shape: e.shape.clone(),
                        bytes: bytes.to_vec(),
                    },
                );
            }
        }
        Ok(out)
    }
}

fn err(path: &Path, what: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        what: what.into(),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The shard files, each with the tensor names the index assigns it (None: a single file).
type Shards = Vec<(String, Option<Vec<String>>)>;

fn shard_files(dir: &Path) -> Result<Shards> {
    let index = dir.join(INDEX);
    if !index.exists() {
        if dir.join(SINGLE).exists() {
            return Ok(vec![(SINGLE.to_string(), None)]);
        }
        return Err(err(
            dir,
            format!("neither {SINGLE} nor {INDEX} is in the directory"),
        ));
    }
    let text = read_text(&index)?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(&index, format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| err(&index, "no \"weight_map\" object"))?;
    let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| err(&index, format!("weight_map[{name:?}] is not a file name")))?;
        // A shard is a plain file name in this directory, never a path elsewhere.
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(err(
                &index,
                format!("weight_map[{name:?}] = {file:?} is not a file name in the directory"),
            ));
        }
        files
            .entry(file.to_string())
            .or_default()
            .push(name.clone());
    }
    for file in files.keys() {
        if !dir.join(file).is_file() {
            return Err(err(
                &dir.join(file),
                format!("missing shard {file:?} (listed in {INDEX})"),
            ));
        }
    }
    Ok(files.into_iter().map(|(f, n)| (f, Some(n))).collect())
}

/// The tensor entries of one shard, from its header alone.
fn read_header(path: &Path, file: &str) -> Result<Vec<(String, Entry)>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
    let n = u64::from_le_bytes(len);
    // safetensors caps headers at 100 MB; a larger length is a corrupt or foreign file.
    if n > 100_000_000 || 8 + n > file_len {
        return Err(err(
            path,
            format!("not a safetensors file: header length {n} for a {file_len}-byte file"),
        ));
    }
    let mut head = vec![0u8; 8 + n as usize];
    head[..8].copy_from_slice(&len);
    f.read_exact(&mut head[8..])
        .map_err(|e| err(path, format!("header cut short: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> = std::str::from_utf8(&head[8..])
        .ok()
        .and_then(|h| serde_json::from_str(h).ok())
        .ok_or_else(|| {
            err(
                path,
                "not a safetensors file: the header is not a JSON object",
            )
        })?;
    let base = 8 + n as usize;
    let mut out = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let info = TensorInfo::deserialize(&v)
            .map_err(|e| err(path, format!("tensor {name:?}: bad header entry: {e}")))?;
        let (s, e) = info.data_offsets;
        let elems = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.bitsize()))
            .map(|bits| bits.div_ceil(8));
        if s > e || elems != Some(e - s) || (base + e) as u64 > file_len {
            return Err(err(
                path,
                format!(
                    "tensor {name:?}: data offsets {s}..{e} do not hold {:?} {:?} inside the file",
                    info.dtype, info.shape
                ),
            ));
        }
        out.push((
            name,
            Entry {
                file: file.to_string(),
                dtype: info.dtype,
                shape: info.shape,
                start: base + s,
                end: base + e,
            },
        ));
    }
    Ok(out)
}
