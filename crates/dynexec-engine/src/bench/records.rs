//! `bench generate`'s rows as llama-bench writes its results: one record per implementation
//! and test (`pp512`, `tg128`), with llama-bench's field names (`model_type`, `n_threads`,
//! `n_prompt`, `n_gen`, `avg_ts`, `stddev_ts`, `samples_ts`, ...) alongside dynexec's
//! (`implementation`, `test`, `median_ts`), so dashboards that read llama-bench's
//! `-o json|jsonl|csv|md` read dynexec's too.
//!
//! llama-bench's fields that describe llama.cpp's own machinery (`cpu_mask`, `poll`,
//! `split_mode`, `tensor_split`, ...) are left out rather than made up.

use super::Row;
use dynexec_core::stats::Summary;
use dynexec_core::{Error, Result};
use serde::Serialize;

/// What every record of one run shares: the model and the machine.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// dynexec's version (llama-bench: the llama.cpp commit); a peer's row name on its records.
    pub build_commit: String,
    /// The CPU's model name.
    pub cpu_info: String,
    /// The GPU, or empty on the CPU.
    pub gpu_info: String,
    /// `CPU`, `CUDA` or `Metal`.
    pub backends: String,
    /// The model file.
    pub model_filename: String,
    /// Architecture, size and weight format, e.g. `qwen2 1.8B gguf`.
    pub model_type: String,
    /// Bytes of the model file(s).
    pub model_size: u64,
    /// Parameters, embeddings included.
    pub model_n_params: u64,
    /// Tokens per prefill forward (the whole prompt).
    pub n_batch: usize,
    /// Compute threads.
    pub n_threads: usize,
    /// The KV cache's element type.
    pub type_k: String,
    /// The KV cache's element type.
    pub type_v: String,
    /// When the run ended, RFC 3339 (UTC).
    pub test_time: String,
}

/// One llama-bench record.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Which implementation ran: dynexec's or a peer's row name.
    pub implementation: String,
    /// llama-bench's test name: `ppN` (prefill of N tokens) or `tgN` (N decoded tokens).
    pub test: String,
    /// The model and machine, flattened into the record as llama-bench writes them.
    #[serde(flatten)]
    pub run: RunInfo,
    /// Prompt tokens of this test (0 for `tg`).
    pub n_prompt: usize,
    /// Generated tokens of this test (0 for `pp`).
    pub n_gen: usize,
    /// Mean nanoseconds per run of the test.
    pub avg_ns: u64,
    /// Standard deviation of those, in ns.
    pub stddev_ns: u64,
    /// Mean tokens/s over the runs.
    pub avg_ts: f64,
    /// Standard deviation of tokens/s.
    pub stddev_ts: f64,
    /// Median tokens/s (dynexec's reports and ratios use medians).
    pub median_ts: f64,
    /// Each run's nanoseconds.
    pub samples_ns: Vec<u64>,
    /// Each run's tokens/s.
    pub samples_ts: Vec<f64>,
}

/// The records of `rows`: a `pp` record per row, and a `tg` record where tokens were generated.
pub fn records(rows: &[Row], run: &RunInfo, n_prompt: usize, n_gen: usize) -> Vec<Record> {
    let mut out = Vec::new();
    for row in rows {
        let tests = [
            (
                format!("pp{n_prompt}"),
                n_prompt,
                0,
                &row.prefill,
                &row.prefill_samples,
            ),
            (
                format!("tg{n_gen}"),
                0,
                n_gen,
                &row.decode,
                &row.decode_samples,
            ),
        ];
        for (test, p, g, summary, samples) in tests {
            if samples.is_empty() {
                continue;
            }
            let mut rec = record(row.implementation, test, run, p, g, summary, samples);
            // A peer's record is not dynexec's build: it carries the peer's row name.
            if !row.implementation.starts_with("dynexec") {
                rec.run.build_commit = row.implementation.to_string();
            }
            out.push(rec);
        }
    }
    out
}

fn record(
    implementation: &str,
    test: String,
    run: &RunInfo,
    n_prompt: usize,
    n_gen: usize,
    summary: &Summary,
    samples: &[f64],
) -> Record {
    let tokens = (n_prompt + n_gen) as f64;
    // A run measured at 0 tokens/s (none at all) has no duration to report.
    let samples_ns: Vec<u64> = samples
        .iter()
        .map(|&ts| {
            if ts > 0.0 {
                (tokens / ts * 1e9).round() as u64
            } else {
                0
            }
        })
        .collect();
    let as_f64: Vec<f64> = samples_ns.iter().map(|&ns| ns as f64).collect();
    let ns = Summary::of(&as_f64);
    Record {
        implementation: implementation.to_string(),
        test,
        run: run.clone(),
        n_prompt,
        n_gen,
        avg_ns: ns.as_ref().map_or(0, |s| s.mean.round() as u64),
        stddev_ns: ns.as_ref().map_or(0, |s| s.stddev.round() as u64),
        avg_ts: summary.mean,
        stddev_ts: summary.stddev,
        median_ts: summary.median,
        samples_ns,
        samples_ts: samples.to_vec(),
    }
}

/// An output format of llama-bench's `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON array of records.
    Json,
    /// One JSON record per line.
    Jsonl,
    /// A header line of field names, then a line per record; samples space-separated.
    Csv,
    /// llama-bench's Markdown table (model, size, params, backend, threads, test, t/s),
    /// led by the implementation.
    Md,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "json" => Ok(Self::Json),
            "jsonl" => Ok(Self::Jsonl),
            "csv" => Ok(Self::Csv),
            "md" => Ok(Self::Md),
            other => Err(Error::InvalidArgument(format!(
                "output format `{other}`: use json, jsonl, csv or md (llama-bench's -o)"
            ))),
        }
    }
}

/// The records written in `format`, ending with a newline.
pub fn render(records: &[Record], format: Format) -> Result<String> {
    let json =
        |r: &Record| serde_json::to_value(r).map_err(|e| Error::InvalidArgument(e.to_string()));
    match format {
        Format::Json => serde_json::to_string_pretty(records)
            .map(|s| s + "\n")
            .map_err(|e| Error::InvalidArgument(e.to_string())),
        Format::Jsonl => {
            let mut out = String::new();
            for r in records {
                out.push_str(&json(r)?.to_string());
                out.push('\n');
            }
            Ok(out)
        }
        Format::Csv => {
            let mut out = String::new();
            for (i, r) in records.iter().enumerate() {
                let serde_json::Value::Object(fields) = json(r)? else {
                    continue;
                };
                if i == 0 {
                    let names: Vec<&str> = fields.keys().map(String::as_str).collect();
                    out.push_str(&names.join(","));
                    out.push('\n');
                }
                let cells: Vec<String> = fields.values().map(csv_cell).collect();
                out.push_str(&cells.join(","));
                out.push('\n');
            }
            Ok(out)
        }
        Format::Md => {
            let mut out = String::from(
                "| implementation | model | size | params | backend | threads | test | t/s |\n\
                 | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |\n",
            );
            for r in records {
                out.push_str(&format!(
                    "| {} | {} | {:.2} GiB | {:.2} B | {} | {} | {} | {:.2} ± {:.2} |\n",
                    r.implementation,
                    r.run.model_type,
                    r.run.model_size as f64 / (1u64 << 30) as f64,
                    r.run.model_n_params as f64 / 1e9,
                    r.run.backends,
                    r.run.n_threads,
                    r.test,
                    r.avg_ts,
                    r.stddev_ts
                ));
            }
            Ok(out)
        }
    }
}

/// A CSV cell: numbers as they are, arrays space-separated, text quoted when it must be.
fn csv_cell(value: &serde_json::Value) -> String {
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    };
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// `secs` after the Unix epoch as RFC 3339 UTC (`2026-12-02T15:04:05Z`).
pub fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &'static str, pp: &[f64], tg: &[f64]) -> Row {
        let summary = |s: &[f64]| Summary::of(s).unwrap_or(super::super::NO_SAMPLES);
        Row {
            implementation: name,
            prefill_tokens_per_s: summary(pp).median,
            decode_tokens_per_s: summary(tg).median,
            prefill: summary(pp),
            decode: summary(tg),
            prefill_samples: pp.to_vec(),
            decode_samples: tg.to_vec(),
        }
    }

    fn run_info() -> RunInfo {
        RunInfo {
            build_commit: "dynexec 0.1.0".into(),
            cpu_info: "AMD EPYC".into(),
            gpu_info: String::new(),
            backends: "CPU".into(),
            model_filename: "m.gguf".into(),
            model_type: "qwen2 1.8B gguf".into(),
            model_size: 1 << 30,
            model_n_params: 1_777_088_000,
            n_batch: 64,
            n_threads: 2,
            type_k: "f32".into(),
            type_v: "f32".into(),
            test_time: rfc3339(0),
        }
    }

    #[test]
    fn rows_become_llama_bench_records_in_every_format() {
        let rows = [
            row("dynexec", &[100.0, 200.0], &[10.0, 20.0]),
            row("llama.cpp", &[50.0], &[]),
        ];
        let recs = records(&rows, &run_info(), 64, 128);
        let tests: Vec<(&str, &str)> = recs
            .iter()
            .map(|r| (r.implementation.as_str(), r.test.as_str()))
            .collect();
        assert_eq!(
            tests,
            [
                ("dynexec", "pp64"),
                ("dynexec", "tg128"),
                ("llama.cpp", "pp64")
            ]
        );
        // 64 tokens at 100 and 200 tok/s: 640 and 320 ms.
        assert_eq!(recs[0].samples_ns, [640_000_000, 320_000_000]);
        assert_eq!(recs[0].avg_ns, 480_000_000);
        assert_eq!(
            (recs[0].avg_ts, recs[1].n_prompt, recs[1].n_gen),
            (150.0, 0, 128)
        );
        assert_eq!(recs[2].run.build_commit, "llama.cpp");

        let json: serde_json::Value =
            serde_json::from_str(&render(&recs, Format::Json).unwrap()).unwrap();
        for key in [
            "model_type",
            "model_size",
            "model_n_params",
            "n_threads",
            "n_prompt",
            "n_gen",
            "avg_ns",
            "avg_ts",
            "stddev_ts",
            "samples_ts",
            "test_time",
            "implementation",
            "test",
        ] {
            assert!(json[0].get(key).is_some(), "{key} missing");
        }
        let jsonl = render(&recs, Format::Jsonl).unwrap();
        assert_eq!(jsonl.lines().count(), 3);
        assert!(jsonl
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
        let csv = render(&recs, Format::Csv).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 4);
        let header: Vec<&str> = lines[0].split(',').collect();
        assert!(header.contains(&"avg_ts") && header.contains(&"n_threads"));
        let md = render(&recs, Format::Md).unwrap();
        assert!(md.contains("| dynexec | qwen2 1.8B gguf | 1.00 GiB | 1.78 B | CPU | 2 | pp64 | 150.00 ± 70.71 |"), "{md}");
        assert!("xml".parse::<Format>().is_err());
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_225_045), "2026-12-02T15:24:05Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
