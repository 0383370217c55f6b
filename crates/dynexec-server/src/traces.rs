//! Hidden-state traces of served requests (`serve --trace-dir DIR`): a request that opts in
//! (`"dynexec": {"trace": {"layers": [...]}}`) has its residual stream recorded at the chosen
//! layers during its own forwards and saved, when it finishes, in the format `generate
//! --trace` writes (`ID.safetensors` plus `ID.safetensors.json`), named by the response id.
//! The folder is held under a byte quota: the oldest traces are deleted to make room, and a
//! warning names them. `dynexec analyze --trace DIR/ID.safetensors` reads one back without
//! the model.

use dynexec_core::trace::Trace;
use dynexec_core::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where traces go and how many bytes they may take together.
#[derive(Debug, Clone)]
pub struct TraceStore {
    dir: PathBuf,
    quota: u64,
}

/// Where a request's trace went (the `dynexec.trace` field of its response).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TraceReport {
    /// The saved states (safetensors; the JSON sidecar is this path plus `.json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The traced layers (0 = embeddings).
    pub layers: Vec<usize>,
    /// Positions recorded: the prompt and every generated token fed back.
    pub positions: usize,
    /// Bytes the trace takes on disk.
    pub bytes: u64,
    /// Older traces deleted to keep the folder under its quota.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
    /// Why the trace was not saved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TraceReport {
    /// The report of a trace that could not be saved, and why.
    pub fn failed(trace: &Trace, error: String) -> Self {
        Self {
            path: None,
            layers: trace.layers(),
            positions: trace.positions(),
            bytes: 0,
            dropped: Vec::new(),
            error: Some(error),
        }
    }
}

impl TraceStore {
    /// A store in `dir` (created if missing) holding at most `quota` bytes of traces.
    pub fn open(dir: &Path, quota: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if quota == 0 {
            return Err(Error::InvalidArgument(
                "the trace quota must be more than 0 bytes".into(),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            quota,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The most bytes the folder's traces may take together.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// Saves `trace` as `NAME.safetensors` (and its sidecar) after deleting the oldest traces
    /// that would push the folder over its quota. Never fails: what went wrong is in the
    /// report's `error`, since the answer itself is already generated.
    pub fn save(
        &self,
        name: &str,
        trace: &Trace,
        model: &str,
        token_ids: &[u32],
        prompt_tokens: usize,
    ) -> TraceReport {
        let positions = trace.positions();
        let layers = trace.layers();
        let mut report = TraceReport {
            path: None,
            bytes: 0,
            positions,
            layers,
            dropped: Vec::new(),
            error: None,
        };
        let result = (|| -> Result<PathBuf> {
            let features = trace
                .layer(report.layers[0])?
                .map_or(0, |t| t.dim(1).unwrap_or(0));
            // The states, the safetensors header and the sidecar's token ids, generously.
            let size = Trace::size_for(report.layers.len(), positions, features)
                + 4096
                + 12 * token_ids.len() as u64;
            if size > self.quota {
                return Err(Error::InvalidArgument(format!(
                    "the trace takes {size} bytes, more than the whole trace quota of {} bytes",
                    self.quota
                )));
            }
            report.dropped = self.make_room(size)?;
            let path = self.dir.join(format!("{name}.safetensors"));
            trace.save(&path, model, token_ids, prompt_tokens)?;
            report.bytes = file_bytes(&path);
            Ok(path)
        })();
        match result {
            Ok(path) => report.path = Some(path),
            Err(e) => {
                eprintln!("warning: the trace of {name} was not saved: {e}");
                report.error = Some(e.to_string());
            }
        }
        if !report.dropped.is_empty() {
            eprintln!(
                "warning: trace quota of {} bytes in {}: deleted the oldest traces {} to save {name}",
                self.quota,
                self.dir.display(),
                report.dropped.join(", ")
            );
        }
        report
    }

    /// Deletes the oldest saved traces until `incoming` more bytes fit the quota; returns
    /// their names.
    fn make_room(&self, incoming: u64) -> Result<Vec<String>> {
        let mut saved = self.saved()?;
        let mut used: u64 = saved.iter().map(|s| s.bytes).sum();
        saved.sort_by_key(|s| s.modified);
        let mut dropped = Vec::new();
        for old in saved {
            if used + incoming <= self.quota {
                break;
            }
            for path in [&old.path, &sidecar(&old.path)] {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(path, e)),
                }
            }
            used -= old.bytes;
            dropped.push(old.name);
        }
        Ok(dropped)
    }

    /// The traces in the folder: safetensors files with a JSON sidecar.
    fn saved(&self) -> Result<Vec<SavedTrace>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".safetensors"))
            else {
                continue;
            };
            let json = sidecar(&path);
            if !json.exists() {
                continue;
            }
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push(SavedTrace {
                name: name.to_string(),
                bytes: file_bytes(&path) + file_bytes(&json),
                modified,
                path,
            });
        }
        Ok(out)
    }
}

struct SavedTrace {
    name: String,
    path: PathBuf,
    bytes: u64,
    modified: SystemTime,
}

fn sidecar(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".json");
    PathBuf::from(name)
}

fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Reads a size such as `512M`, `2G`, `1.5G` or `1000000` (bytes; K, M and G are powers of
/// 1024, as llama.cpp's and most tools' sizes are).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let (number, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&t[..i], t[i..].to_ascii_uppercase()),
        None => (t, String::new()),
    };
    let scale: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(format!(
                "`{text}` is not a size: write e.g. 512M, 2G or 1000000"
            ))
        }
    };
    match number.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok((n * scale as f64) as u64),
        _ => Err(format!(
            "`{text}` is not a positive size: write e.g. 512M, 2G or 1000000"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn trace(positions: usize) -> Trace {
        let mut trace = Trace::new([0, 1]);
        let states = Tensor::zeros((positions, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        trace.record(0, &states).unwrap();
        trace.record(1, &states).unwrap();
        trace
    }

    #[test]
    fn sizes_parse_like_other_tools() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("3GiB"), Ok(3 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
    }

    #[test]
    fn the_oldest_traces_make_room_and_the_quota_holds() {
        let dir = tempfile::tempdir().unwrap();
        // Each trace: 2 layers x 10 positions x 8 features x 4 bytes = 640 bytes of states.
        let one = file_size_of(&trace(10));
        // Room for three traces (a new one is counted with a margin for its header).
        let store = TraceStore::open(dir.path(), 3 * one + 4096).unwrap();
        let mut names = Vec::new();
        for i in 0..5 {
            let name = format!("cmpl-{i}");
            let report = store.save(&name, &trace(10), "m", &[1; 10], 4);
            assert!(report.error.is_none(), "{report:?}");
            assert_eq!(report.positions, 10);
            names.push(name);
            // Distinct modification times, so "oldest" is well defined.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let total: u64 = store.saved().unwrap().iter().map(|s| s.bytes).sum();
            assert!(total <= store.quota(), "{total} > {}", store.quota());
            if i >= 3 {
                assert_eq!(report.dropped, vec![names[i - 3].clone()]);
            } else {
                assert!(report.dropped.is_empty());
            }
        }
        let mut left: Vec<String> = store.saved().unwrap().into_iter().map(|s| s.name).collect();
        left.sort();
        assert_eq!(left, vec!["cmpl-2", "cmpl-3", "cmpl-4"]);
        // A trace bigger than the whole quota is refused, and nothing is deleted for it.
        let report = store.save("cmpl-big", &trace(100), "m", &[1; 100], 4);
        assert!(report.path.is_none());
        assert!(report
            .error
            .unwrap()
            .contains("more than the whole trace quota"));
        assert_eq!(store.saved().unwrap().len(), 3);
    }

    fn file_size_of(trace: &Trace) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        trace.save(&path, "m", &[1; 10], 4).unwrap();
        file_bytes(&path) + file_bytes(&sidecar(&path))
    }
}
