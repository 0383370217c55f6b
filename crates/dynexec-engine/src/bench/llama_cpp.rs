//! llama.cpp's `llama-bench` as one more contestant in a generation benchmark.

use super::Contestant;
use dynexec_core::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A failure of the llama-bench run, worded for the user.
fn failed(message: String) -> Error {
    Error::InvalidArgument(message)
}

/// The row name of the first (or only) llama.cpp build.
pub const LLAMA_CPP_NAME: &str = "llama.cpp (llama-bench)";

/// A `llama-bench` binary run on one GGUF: each run is one llama-bench repetition of a pp and
/// a tg test, so runs interleave with dynexec's like the other implementations.
pub struct LlamaCpp {
    name: &'static str,
    binary: PathBuf,
    gguf: PathBuf,
    threads: usize,
}

impl LlamaCpp {
    /// `name` tells builds apart when several are compared ([`LLAMA_CPP_NAME`] for one).
    pub fn new(name: &'static str, binary: &Path, gguf: &Path, threads: usize) -> Result<Self> {
        if !binary.is_file() {
            return Err(failed(format!(
                "{}: no such file; give the path of llama.cpp's llama-bench binary",
                binary.display()
            )));
        }
        Ok(Self {
            name,
            binary: binary.to_path_buf(),
            gguf: gguf.to_path_buf(),
            threads,
        })
    }
}

impl Contestant for LlamaCpp {
    fn name(&self) -> &'static str {
        self.name
    }

    /// llama-bench reports tokens/s per test; they are turned back into seconds for the
    /// prompt and generation lengths asked.
    fn run(&mut self, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)> {
        let out = Command::new(&self.binary)
            .arg("-m")
            .arg(&self.gguf)
            .args(["-t", &self.threads.to_string()])
            .args(["-p", &prompt.len().to_string()])
            .args(["-n", &gen_tokens.to_string()])
            .args(["-r", "1", "-o", "json"])
            .output()
            .map_err(|e| {
                Error::file(&self.binary, e).context(format!("running {}", self.binary.display()))
            })?;
        if !out.status.success() {
            return Err(failed(format!(
                "{} failed ({}): {}",
                self.binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let tests: Vec<Value> = serde_json::from_slice(&out.stdout).map_err(|_| {
            failed(format!(
                "{} did not print llama-bench's JSON (is it llama-bench?)",
                self.binary.display()
            ))
        })?;
        let (pp, tg) = parse_rates(&tests)?;
        let decode = match (gen_tokens, tg) {
            (0, _) => 0.0,
            (n, Some(rate)) => n as f64 / rate,
            (_, None) => return Err(failed("llama-bench reported no generation test".into())),
        };
        Ok((prompt.len() as f64 / pp, decode))
    }
}

/// Row names for the llama-bench binaries compared in one run: [`LLAMA_CPP_NAME`] for the
/// first (the ratios of earlier versions' JSON refer to it), then `llama.cpp (BUILD)`, BUILD
/// being the folder above the binary's `bin/` (CMake's build folder, which names the build
/// where several sit side by side), or the path itself.
pub fn build_names(binaries: &[PathBuf]) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::with_capacity(binaries.len());
    for (i, binary) in binaries.iter().enumerate() {
        if i == 0 {
            names.push(LLAMA_CPP_NAME);
            continue;
        }
        let build = binary
            .parent()
            .filter(|bin| bin.file_name().is_some_and(|n| n == "bin"))
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned());
        let mut name = format!(
            "llama.cpp ({})",
            build.unwrap_or_else(|| binary.display().to_string())
        );
        if names.contains(&name.as_str()) {
            name = format!("llama.cpp ({})", binary.display());
        }
        if names.contains(&name.as_str()) {
            name = format!("llama.cpp (#{})", i + 1);
        }
        // A handful per process, printed and serialized by name.
        names.push(Box::leak(name.into_boxed_str()));
    }
    names
}

/// Prefill and generation tokens/s from llama-bench's JSON tests (`n_prompt`/`n_gen`,
/// `avg_ts`).
pub(crate) fn parse_rates(tests: &[Value]) -> Result<(f64, Option<f64>)> {
    let rate = |prompt: bool| {
        tests.iter().find_map(|t| {
            let n_prompt = t["n_prompt"].as_u64().unwrap_or(0);
            let n_gen = t["n_gen"].as_u64().unwrap_or(0);
            let wanted = if prompt {
                n_prompt > 0 && n_gen == 0
            } else {
                n_gen > 0 && n_prompt == 0
            };
            wanted.then(|| t["avg_ts"].as_f64()).flatten()
        })
    };
    let pp = rate(true)
        .ok_or_else(|| failed("llama-bench reported no prompt-processing test".into()))?;
    Ok((pp, rate(false)))
}

#[cfg(test)]
mod tests {
    use super::parse_rates;
    use serde_json::json;

    #[test]
    fn rates_are_read_from_llama_bench_json() {
        let tests = vec![
            json!({"n_prompt": 64, "n_gen": 0, "avg_ts": 187.5, "model_type": "llama ?B Q4_1"}),
            json!({"n_prompt": 0, "n_gen": 128, "avg_ts": 62.25}),
        ];
        assert_eq!(parse_rates(&tests).unwrap(), (187.5, Some(62.25)));
        assert!(parse_rates(&[json!({"n_prompt": 0, "n_gen": 8, "avg_ts": 1.0})]).is_err());
    }
}

/// One prompt decoded by llama.cpp's `llama-speculative-simple` with a draft model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaSpeculativeRun {
    /// Tokens it decoded (it may overshoot the number asked for by a draft).
    pub tokens: usize,
    /// Seconds decoding took, as it reports them (the prompt's pass excluded).
    pub secs: f64,
    /// Draft tokens proposed.
    pub drafted: usize,
    /// Draft tokens accepted.
    pub accepted: usize,
}

/// llama.cpp's draft-model speculative decoding (`llama-speculative-simple --spec-type
/// draft-simple`), greedy, as a peer of `bench speculative`'s rows.
pub struct LlamaSpeculative {
    /// The `llama-speculative-simple` binary.
    pub binary: PathBuf,
    /// The target's GGUF.
    pub target: PathBuf,
    /// The draft's GGUF.
    pub draft: PathBuf,
    /// Threads for both models.
    pub threads: usize,
}

impl LlamaSpeculative {
    /// Checks that the files exist.
    pub fn new(binary: &Path, target: &Path, draft: &Path, threads: usize) -> Result<Self> {
        for (what, path) in [
            ("llama-speculative-simple binary", binary),
            ("target GGUF", target),
            ("draft GGUF", draft),
        ] {
            if !path.is_file() {
                return Err(failed(format!(
                    "{}: no such file; llama.cpp needs the {what} (scripts/build-llama-bench.sh builds the binary)",
                    path.display()
                )));
            }
        }
        Ok(Self {
            binary: binary.to_path_buf(),
            target: target.to_path_buf(),
            draft: draft.to_path_buf(),
            threads,
        })
    }

    /// Decodes `prompt` (text; llama.cpp tokenizes it, special tokens included) greedily for
    /// `max_tokens`, drafting at most `draft_max` tokens per step.
    pub fn run(
        &self,
        prompt: &str,
        max_tokens: usize,
        draft_max: usize,
    ) -> Result<LlamaSpeculativeRun> {
        let prompt_file =
            std::env::temp_dir().join(format!("dynexec-llama-spec-{}.txt", std::process::id()));
        std::fs::write(&prompt_file, prompt).map_err(|e| Error::file(&prompt_file, e))?;
        let threads = self.threads.to_string();
        let out = Command::new(&self.binary)
            .arg("-m")
            .arg(&self.target)
            .arg("-md")
            .arg(&self.draft)
            .arg("-f")
            .arg(&prompt_file)
            .args([
                "-n",
                &max_tokens.to_string(),
                "-t",
                &threads,
                "-td",
                &threads,
            ])
            .args(["--spec-type", "draft-simple", "--spec-draft-n-min", "0"])
            .args(["--spec-draft-n-max", &draft_max.to_string()])
            .args(["--temp", "0", "-c", "4096"])
            .output();
        let _ = std::fs::remove_file(&prompt_file);
        let out = out.map_err(|e| {
            Error::file(&self.binary, e).context(format!("running {}", self.binary.display()))
        })?;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(failed(format!(
                "{} failed ({}): {}",
                self.binary.display(),
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )));
        }
        parse_speculative_log(&log).ok_or_else(|| {
            failed(format!(
                "{} printed no `decoded N tokens in S seconds` and n_drafted/n_accept lines (is it llama-speculative-simple?)",
                self.binary.display()
            ))
        })
    }
}

/// Reads `decoded N tokens in S seconds`, `n_drafted = N` and `n_accept = N` from
/// llama-speculative-simple's log.
pub(crate) fn parse_speculative_log(log: &str) -> Option<LlamaSpeculativeRun> {
    let after = |line: &str, key: &str| -> Option<String> {
        line.split_once(key)
            .map(|(_, rest)| rest.trim().to_string())
    };
    let (mut decoded, mut drafted, mut accepted) = (None, None, None);
    for line in log.lines() {
        if let Some(rest) = after(line, "decoded ") {
            // "  68 tokens in    4.518 seconds, speed: ..."
            let mut words = rest.split_whitespace();
            let tokens = words.next()?.parse::<usize>().ok();
            let secs = words.nth(2).and_then(|s| s.parse::<f64>().ok());
            if let (Some(t), Some(s)) = (tokens, secs) {
                decoded = Some((t, s));
            }
        } else if let Some(rest) = after(line, "n_drafted =") {
            drafted = rest.parse().ok();
        } else if let Some(rest) = after(line, "n_accept  =") {
            accepted = rest.parse().ok();
        }
    }
    let (tokens, secs) = decoded?;
    Some(LlamaSpeculativeRun {
        tokens,
        secs,
        drafted: drafted?,
        accepted: accepted?,
    })
}

#[cfg(test)]
mod speculative_tests {
    use super::*;

    #[test]
    fn speculative_log_is_read() {
        let log = "0.08.930.380 I encoded  119 tokens in    1.862 seconds, speed:   63.905 t/s\n0.08.930.416 I decoded   68 tokens in    4.518 seconds, speed:   15.052 t/s\n0.08.930.485 I n_draft   = 3\n0.08.930.553 I n_drafted = 57\n0.08.930.585 I n_accept  = 49\n";
        assert_eq!(
            parse_speculative_log(log),
            Some(LlamaSpeculativeRun {
                tokens: 68,
                secs: 4.518,
                drafted: 57,
                accepted: 49
            })
        );
        assert_eq!(
            parse_speculative_log("decoded 3 tokens in 1.0 seconds"),
            None
        );
    }
}
