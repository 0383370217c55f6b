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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Prefixes of the files the store saves (response ids): the only ones it ever deletes.
const OWN_PREFIXES: [&str; 2] = ["chatcmpl-", "cmpl-"];

/// Where traces go and how many bytes they may take together.
#[derive(Debug, Clone)]
pub struct TraceStore {
    dir: PathBuf,
    quota: u64,
    /// Bytes reserved by traces being recorded (they hold memory until saved).
    recording: Arc<AtomicU64>,
    /// One save at a time, so two cannot both count on the same room.
    saving: Arc<Mutex<()>>,
}

/// Bytes a recording trace holds, given back when it is dropped.
#[derive(Debug)]
pub struct Reservation {
    bytes: u64,
    recording: Arc<AtomicU64>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.recording.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Where a request's trace went (the `dynexec.trace` field of its response).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TraceReport {
    /// The saved states' file name in the server's trace folder (safetensors; the JSON
    /// sidecar is this name plus `.json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The traced layers (0 = embeddings).
    pub layers: Vec<usize>,
    /// Positions recorded: the prompt and every generated token fed back.
    pub positions: usize,
    /// Bytes the trace takes on disk, sidecar included.
    pub bytes: u64,
    /// Why the trace was not saved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TraceReport {
    /// The report of a trace that could not be saved, and why.
    pub fn failed(trace: &Trace, error: String) -> Self {
        Self {
            file: None,
            layers: trace.layers(),
            positions: trace.positions(),
            bytes: 0,
            error: Some(error),
        }
    }
}

/// Bytes a trace of `layers` layers over `positions` positions of `features` takes on disk,
/// generously: the states, the safetensors header and the sidecar with its token ids. What
/// admission checks against the quota, and what a save makes room for.
pub fn bytes_needed(layers: usize, positions: usize, features: usize) -> u64 {
    Trace::size_for(layers, positions, features)
        + 4096
        + 160 * layers as u64
        + 12 * positions as u64
}

impl TraceStore {
    /// A store in `dir` (created if missing) holding at most `quota` bytes of traces.
    pub fn open(dir: &Path, quota: u64) -> Result<Self> {
        if quota == 0 {
            return Err(Error::InvalidArgument(
                "the trace quota must be more than 0 bytes".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            quota,
            recording: Arc::new(AtomicU64::new(0)),
            saving: Arc::new(Mutex::new(())),
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The most bytes the folder's traces may take together; also the most that traces
    /// being recorded may hold at once.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// Reserves `bytes` for a trace about to be recorded, or says why not: the traces being
    /// recorded already hold so much that this one would take them over the quota.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation> {
        let mut held = self.recording.load(Ordering::Relaxed);
        loop {
            if held + bytes > self.quota {
                return Err(Error::InvalidArgument(format!(
                    "traces being recorded hold {held} bytes and this one needs {bytes}, more than the server's trace quota of {} together: retry when they finish, trace fewer layers or ask for fewer tokens",
                    self.quota
                )));
            }
            match self.recording.compare_exchange(
                held,
                held + bytes,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Ok(Reservation {
                        bytes,
                        recording: self.recording.clone(),
                    })
                }
                Err(now) => held = now,
            }
        }
    }

    /// Saves `trace` as `NAME.safetensors` (and its sidecar) after deleting the oldest traces
    /// this store saved that would push the folder over its quota, each named in a warning.
    /// Never fails: what went wrong is in the report's `error`, since the answer itself is
    /// already generated.
    pub fn save(
        &self,
        name: &str,
        trace: &Trace,
        model: &str,
        token_ids: &[u32],
        prompt_tokens: usize,
    ) -> TraceReport {
        let mut report = TraceReport::failed(trace, String::new());
        let _one_at_a_time = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let result = (|| -> Result<String> {
            let first = report
                .layers
                .first()
                .ok_or_else(|| Error::InvalidArgument("the trace has no layers".into()))?;
            let features = trace.layer(*first)?.map_or(0, |t| t.dim(1).unwrap_or(0));
            let size = bytes_needed(report.layers.len(), report.positions, features);
            if size > self.quota {
                return Err(Error::InvalidArgument(format!(
                    "the trace takes {size} bytes, more than the whole trace quota of {} bytes",
                    self.quota
                )));
            }
            let dropped = self.make_room(size)?;
            if !dropped.is_empty() {
                eprintln!(
                    "warning: trace quota of {} bytes in {}: deleted the oldest traces {} to save {name}",
                    self.quota,
                    self.dir.display(),
                    dropped.join(", ")
                );
            }
            let file = format!("{name}.safetensors");
            let path = self.dir.join(&file);
            trace.save(&path, model, token_ids, prompt_tokens)?;
            report.bytes = file_bytes(&path) + file_bytes(&Trace::sidecar_path(&path));
            Ok(file)
        })();
        match result {
            Ok(file) => {
                report.file = Some(file);
                report.error = None;
            }
            Err(e) => {
                eprintln!("warning: the trace of {name} was not saved: {e}");
                report.error = Some(e.to_string());
            }
        }
        report
    }

    /// Deletes the oldest traces this store saved until `incoming` more bytes fit the
    /// quota; returns their names. Other files in the folder are counted, never deleted.
    fn make_room(&self, incoming: u64) -> Result<Vec<String>> {
        let mut saved = self.saved()?;
        let mut used: u64 = saved.iter().map(|s| s.bytes).sum();
        saved.retain(|s| OWN_PREFIXES.iter().any(|p| s.name.starts_with(p)));
        saved.sort_by_key(|s| s.modified);
        let mut dropped = Vec::new();
        for old in saved {
            if used + incoming <= self.quota {
                break;
            }
            for path in [old.path.clone(), Trace::sidecar_path(&old.path)] {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(&path, e)),
                }
            }
            used -= old.bytes;
            dropped.push(old.name);
        }
        if used + incoming > self.quota {
            return Err(Error::InvalidArgument(format!(
                "{used} bytes of other files in {} leave no room for {incoming} more under the trace quota of {} bytes",
                self.dir.display(),
                self.quota
            )));
        }
        Ok(dropped)
    }

    /// The traces in the folder: safetensors files, with their sidecars when present (a
    /// file left without one by an interrupted save is counted too).
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
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            out.push(SavedTrace {
                name: name.to_string(),
                bytes: file_bytes(&path) + file_bytes(&Trace::sidecar_path(&path)),
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
        Ok(n) if n.is_finite() && n * scale as f64 >= 1.0 => Ok((n * scale as f64) as u64),
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
        assert!(parse_size("0.5").is_err());
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
    }

    #[test]
    fn the_oldest_traces_make_room_and_the_quota_holds() {
        let dir = tempfile::tempdir().unwrap();
        // Each trace: 2 layers x 10 positions x 8 features x 4 bytes = 640 bytes of states.
        let one = file_size_of(&trace(10));
        // Room for three traces: two saved and a third counted generously.
        let store = TraceStore::open(dir.path(), 2 * one + bytes_needed(2, 10, 8)).unwrap();
        let mut names = Vec::new();
        for i in 0..5 {
            let name = format!("cmpl-{i}");
            let report = store.save(&name, &trace(10), "m", &[1; 10], 4);
            assert!(report.error.is_none(), "{report:?}");
            assert_eq!(report.positions, 10);
            assert_eq!(report.file, Some(format!("{name}.safetensors")));
            names.push(name);
            // Distinct modification times, so "oldest" is well defined.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let total: u64 = store.saved().unwrap().iter().map(|s| s.bytes).sum();
            assert!(total <= store.quota(), "{total} > {}", store.quota());
            let left: Vec<String> = store.saved().unwrap().into_iter().map(|s| s.name).collect();
            assert_eq!(left.len(), (i + 1).min(3), "{left:?}");
            if i >= 3 {
                assert!(!left.contains(&names[i - 3]), "{left:?}");
            }
        }
        let mut left: Vec<String> = store.saved().unwrap().into_iter().map(|s| s.name).collect();
        left.sort();
        assert_eq!(left, vec!["cmpl-2", "cmpl-3", "cmpl-4"]);
        // A trace bigger than the whole quota is refused, and nothing is deleted for it.
        let report = store.save("cmpl-big", &trace(100), "m", &[1; 100], 4);
        assert!(report.file.is_none());
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
        file_bytes(&path) + file_bytes(&Trace::sidecar_path(&path))
    }

    #[test]
    fn other_files_are_never_deleted_and_recording_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let one = file_size_of(&trace(10));
        let store = TraceStore::open(dir.path(), 2 * one + bytes_needed(2, 10, 8)).unwrap();
        // A user's own trace in the folder counts against the quota but stays.
        trace(10)
            .save(&dir.path().join("mine.safetensors"), "m", &[1; 10], 4)
            .unwrap();
        for i in 0..3 {
            let report = store.save(&format!("cmpl-{i}"), &trace(10), "m", &[1; 10], 4);
            assert!(report.error.is_none(), "{report:?}");
        }
        let names: Vec<String> = store.saved().unwrap().into_iter().map(|s| s.name).collect();
        assert!(names.contains(&"mine".to_string()), "{names:?}");
        assert!(names.contains(&"cmpl-2".to_string()), "{names:?}");
        assert!(!names.contains(&"cmpl-0".to_string()), "{names:?}");
        // Reservations add up to the quota at most, and come back when dropped.
        let quota = store.quota();
        let first = store.reserve(quota / 2).unwrap();
        let err = store.reserve(quota / 2 + 1).unwrap_err();
        assert!(err.to_string().contains("retry when they finish"), "{err}");
        drop(first);
        assert!(store.reserve(quota).is_ok());
    }
}
