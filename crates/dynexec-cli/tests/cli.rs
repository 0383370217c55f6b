//! The `dynexec` binary as a user runs it: output formats, determinism, and a clear error
//! (never a panic) for each kind of bad input.

mod common;

use common::{assert_clear_error, dynexec, stdout_json};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn dynexec_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynexec"));
    cmd.args(args).args(["--device", "cpu", "--quiet"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run dynexec")
}

fn smollm2_path() -> String {
    let out = dynexec(&["models", "path", "smollm2-135m-instruct"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn generate_json_has_every_documented_key_and_greedy_is_deterministic() {
    let args = [
        "generate",
        "--json",
        "--prompt",
        "The capital of France is",
        "-n",
        "8",
    ];
    let a = stdout_json(&dynexec(&args));
    for key in [
        "text",
        "token_ids",
        "prompt_tokens",
        "generated_tokens",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "ttft_ms",
        "device",
    ] {
        assert!(a.get(key).is_some(), "missing `{key}` in {a}");
    }
    assert_eq!(a["device"], "cpu");
    let ids = a["token_ids"].as_array().unwrap();
    assert_eq!(ids.len() as u64, a["generated_tokens"].as_u64().unwrap());
    assert!(!ids.is_empty() && ids.len() <= 8);
    assert!(a["prompt_tokens"].as_u64().unwrap() >= 5);
    assert!(a["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    let b = stdout_json(&dynexec(&args));
    assert_eq!(
        a["token_ids"], b["token_ids"],
        "greedy decoding must be deterministic"
    );
}

#[test]
fn streamed_text_equals_the_json_text() {
    let args = ["generate", "--prompt", "Once upon a time", "-n", "12"];
    let out = dynexec(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let streamed = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("prefill") && stderr.contains("decode") && stderr.contains("ttft"),
        "{stderr}"
    );
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let json = stdout_json(&dynexec(&json_args));
    assert_eq!(
        streamed.trim_end_matches('\n'),
        json["text"].as_str().unwrap()
    );
}

#[test]
fn sampling_with_a_seed_is_reproducible() {
    let args = [
        "generate",
        "--json",
        "--chat",
        "--prompt",
        "Name a fruit.",
        "-n",
        "10",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--seed",
        "11",
    ];
    let a = stdout_json(&dynexec(&args));
    let b = stdout_json(&dynexec(&args));
    assert_eq!(a["token_ids"], b["token_ids"]);
}

#[test]
fn trace_saves_the_requested_layers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.safetensors");
    let out = dynexec(&[
        "generate",
        "--prompt",
        "Hi there",
        "-n",
        "3",
        "--ignore-eos",
        "--trace",
        path.to_str().unwrap(),
        "--trace-layers",
        "0,15,30",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("trace.safetensors.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(info["layers"], serde_json::json!([0, 15, 30]));
    assert_eq!(info["features"], 576);
    // Prompt tokens plus the generated tokens that were fed back (all but the last).
    let positions = info["positions"].as_u64().unwrap();
    assert_eq!(
        info["token_ids"].as_array().unwrap().len() as u64,
        positions
    );
    assert!(positions >= 4);
    let bad = dynexec(&[
        "generate",
        "--prompt",
        "Hi",
        "-n",
        "1",
        "--trace",
        path.to_str().unwrap(),
        "--trace-layers",
        "31",
    ]);
    assert_clear_error(&bad, "past the model's 30 layers");
}

#[test]
fn models_list_and_path() {
    let list = stdout_json(&dynexec(&["models", "list", "--json"]));
    let names: Vec<&str> = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"smollm2-135m-instruct") && names.contains(&"minilm-l6"),
        "{names:?}"
    );
    assert!(Path::new(&smollm2_path()).exists());
}

/// One short `bench generate --json` run (8 prompt tokens, 4 generated, one run) with `extra`.
fn short_bench_generate(extra: &[&str]) -> Value {
    let mut args = vec![
        "bench",
        "generate",
        "--json",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--runs",
        "1",
        "--warmup",
        "0",
    ];
    args.extend_from_slice(extra);
    stdout_json(&dynexec(&args))
}

#[test]
fn bench_generate_reports_ours_and_the_peer() {
    let report = short_bench_generate(&["--peer"]);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["implementation"], "dynexec");
    for row in rows {
        assert!(row["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(row["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
    assert!(report["decode_ratio_vs_peer"].as_f64().unwrap() > 0.0);
}

/// `-o json|jsonl|csv|md` writes llama-bench's records: one per implementation and test,
/// with llama-bench's field names, readable by what reads llama-bench's.
#[test]
fn bench_generate_writes_llama_bench_records() {
    let bench = |format: &str| {
        let args = [
            "bench",
            "generate",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--peer",
            "-o",
            format,
        ];
        let out = dynexec(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let records: Value = serde_json::from_str(&bench("json")).unwrap();
    let records = records.as_array().unwrap();
    let tests: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["implementation"].as_str().unwrap(),
                r["test"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(tests[..2], [("dynexec", "pp8"), ("dynexec", "tg4")]);
    assert_eq!(records.len(), 4, "{records:?}");
    for r in records {
        for key in [
            "model_type",
            "model_n_params",
            "model_size",
            "n_threads",
            "n_prompt",
            "n_gen",
            "avg_ns",
            "stddev_ts",
        ] {
            assert!(r.get(key).is_some(), "{key} missing from {r}");
        }
        assert_eq!(r["samples_ts"].as_array().unwrap().len(), 2);
        assert!(r["avg_ts"].as_f64().unwrap() > 0.0);
    }
    // SmolLM2-135M has 134.5M parameters, as llama.cpp counts them.
    assert_eq!(records[0]["model_n_params"], 134_515_008);
    assert_ne!(records[2]["build_commit"], records[0]["build_commit"]);
    assert_eq!(bench("jsonl").lines().count(), 4);
    let csv = bench("csv");
    assert_eq!(csv.lines().count(), 5);
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .split(',')
        .any(|f| f == "avg_ts"));
    assert!(bench("md").starts_with(
        "| implementation | model | size | params | backend | threads | test | t/s |"
    ));
    assert_clear_error(
        &dynexec(&["bench", "generate", "-o", "xml"]),
        "use json, jsonl, csv or md",
    );
}

/// bench serve's switches are checked before any server is contacted.
#[test]
fn bench_serve_refuses_bad_switches_before_contacting_a_server() {
    for flag in ["--trace", "--speculative"] {
        assert_clear_error(
            &dynexec(&["bench", "serve", flag, "maybe"]),
            "possible values: off, on, both",
        );
    }
}

/// Every instruction set's kernels give the same bits, so the same greedy tokens; the bench
/// names the one it ran and measures the other in the same run; a bad name is a clear error.
#[test]
fn instruction_sets_give_the_same_tokens_and_are_compared_in_one_run() {
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--json",
            "--prompt",
            "def fibonacci(n):",
            "-n",
            "24",
        ];
        args.extend_from_slice(extra);
        stdout_json(&dynexec(&args))["token_ids"].clone()
    };
    assert_eq!(generate(&[]), generate(&["--max-cpu-isa", "avx2"]));
    let report = short_bench_generate(&["--compare-cpu-isa", "avx2"]);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["implementation"], "dynexec --max-cpu-isa avx2");
    assert!(report["decode_ratio_vs_cpu_isa"].as_f64().unwrap() > 0.0);
    assert!(report.get("cpu_isa").is_some(), "{report}");
    assert_clear_error(
        &dynexec(&["generate", "--max-cpu-isa", "sse2", "--prompt", "x"]),
        "unknown instruction set `sse2`: use avx2 or avx512-vnni",
    );
}

#[test]
fn unknown_model_names_and_missing_files() {
    assert_clear_error(
        &dynexec(&["generate", "-m", "no-such-model", "--prompt", "x"]),
        "unknown model `no-such-model`",
    );
    assert_clear_error(
        &dynexec(&["generate", "-m", "/nonexistent/model.gguf", "--prompt", "x"]),
        "model file not found",
    );
    assert_clear_error(
        &dynexec(&["generate", "-m", "hf:not-a-repo", "--prompt", "x"]),
        "hf:ORG/REPO",
    );
}

#[test]
fn chat_templates_that_fail_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.jinja");
    std::fs::write(&broken, "{% for m in messages %}{{ m.content }}").unwrap();
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--chat",
            "--chat-template",
            broken.to_str().unwrap(),
            "--prompt",
            "x",
        ]),
        "broken.jinja",
    );
    let strict = dir.path().join("strict.jinja");
    std::fs::write(
        &strict,
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system prompt is required') }}{% endif %}{{ messages[-1]['content'] }}",
    )
    .unwrap();
    let out = dynexec(&[
        "generate",
        "--chat",
        "--chat-template",
        strict.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_clear_error(&out, "a system prompt is required");
    let out = dynexec(&[
        "generate",
        "--chat",
        "--chat-template",
        strict.to_str().unwrap(),
        "--system",
        "Be brief.",
        "--prompt",
        "Say hi.",
        "-n",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--chat",
            "--chat-template",
            "/no/such/template.jinja",
            "--prompt",
            "x",
        ]),
        "template.jinja",
    );
}

#[test]
fn corrupt_and_truncated_weights() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    assert_clear_error(
        &dynexec(&["generate", "-m", garbage.to_str().unwrap(), "--prompt", "x"]),
        "not a readable GGUF file",
    );

    let real = std::fs::read(smollm2_path()).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &real[..real.len() / 2]).unwrap();
    assert_clear_error(
        &dynexec(&[
            "generate",
            "-m",
            truncated.to_str().unwrap(),
            "--prompt",
            "x",
        ]),
        "truncated or corrupt",
    );

    // A tensor type no reader knows: the type field after `token_embd.weight`'s dimensions.
    let mut unknown = real.clone();
    let name = b"token_embd.weight";
    let at = unknown.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let dims = u32::from_le_bytes(unknown[at..at + 4].try_into().unwrap()) as usize;
    unknown[at + 4 + 8 * dims..at + 8 + 8 * dims].copy_from_slice(&77u32.to_le_bytes());
    let unknown_path = dir.path().join("unknown-type.gguf");
    std::fs::write(&unknown_path, &unknown).unwrap();
    let out = dynexec(&[
        "generate",
        "-m",
        unknown_path.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_clear_error(&out, "unknown dtype for tensor 77");
    assert_clear_error(&out, "llama-quantize");

    let folder = dir.path().join("dense");
    std::fs::create_dir(&folder).unwrap();
    let config = r#"{"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "vocab_size": 50}"#;
    std::fs::write(folder.join("config.json"), config).unwrap();
    std::fs::write(folder.join("tokenizer.json"), b"{}").unwrap();
    std::fs::write(
        folder.join("model.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!",
    )
    .unwrap();
    assert_clear_error(
        &dynexec(&["generate", "-m", folder.to_str().unwrap(), "--prompt", "x"]),
        "corrupt",
    );

    std::fs::write(folder.join("config.json"), b"{ not json").unwrap();
    assert_clear_error(
        &dynexec(&["generate", "-m", folder.to_str().unwrap(), "--prompt", "x"]),
        "not a llama-family config.json",
    );
}

#[test]
fn checksum_mismatch_on_pull() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.gguf"), b"not the pinned bytes").unwrap();
    let manifest = dir.path().join("models.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"[[model]]
name = "pinned"
architecture = "llama"
format = "gguf"
license = "MIT"
file = [{{ path = "w.gguf", sha256 = "{}", bytes = 20 }}]
source = [{{ local = "." }}]
"#,
            "0".repeat(64)
        ),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let env = [
        ("DYNEXEC_MANIFEST", manifest.as_path()),
        ("DYNEXEC_CACHE", cache.as_path()),
    ];
    assert_clear_error(
        &dynexec_env(&["models", "pull", "pinned"], &env),
        "sha256 mismatch",
    );
    assert_clear_error(
        &dynexec_env(&["generate", "-m", "pinned", "--prompt", "x"], &env),
        "sha256 mismatch",
    );
}

#[test]
fn bad_devices_and_flags() {
    assert_clear_error(
        &dynexec(&["--device", "tpu", "models", "list"]),
        "unknown device `tpu`",
    );
    if !cfg!(feature = "cuda") {
        let out = Command::new(env!("CARGO_BIN_EXE_dynexec"))
            .args(["generate", "--device", "cuda", "--prompt", "x"])
            .output()
            .unwrap();
        assert_clear_error(&out, "--features cuda");
    }
    assert_clear_error(
        &dynexec(&["generate", "--prompt", "x", "--temperature=-1"]),
        "--temperature",
    );
    assert_clear_error(
        &dynexec(&["generate", "--prompt", "x", "--top-p", "2"]),
        "--top-p",
    );
    assert_clear_error(&dynexec(&["generate"]), "--prompt");
    assert_clear_error(&dynexec(&["generate", "--prompt", ""]), "empty");
    assert_clear_error(
        &dynexec(&["generate", "--prompt", "x", "--max-tokens", "many"]),
        "invalid value",
    );
    // Library spec errors are worded by the flag that set them.
    assert_clear_error(
        &dynexec(&["diffuse", "--prompt", "x", "--steps", "fast"]),
        "bad --steps `fast`",
    );
    assert_clear_error(
        &dynexec(&["generate", "--prompt", "x", "--draft", "ngram:0,3"]),
        "bad --draft `ngram:0,3`",
    );
}

#[test]
fn prompt_longer_than_the_context() {
    let long = "hello ".repeat(9000);
    assert_clear_error(
        &dynexec(&["generate", "--prompt", &long, "-n", "4"]),
        "context holds 8192",
    );
}

#[test]
fn a_tokenizer_from_another_model_is_refused() {
    let out = dynexec(&["models", "path", "minilm-l6"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paths = String::from_utf8(out.stdout).unwrap();
    let tokenizer = paths
        .lines()
        .find(|l| l.ends_with("tokenizer.json"))
        .unwrap()
        .to_string();
    assert_clear_error(
        &dynexec(&["generate", "--tokenizer", &tokenizer, "--prompt", "x"]),
        "does not match the model's vocabulary",
    );
}

const SAMPLE_TEXT: &str = "The Congress shall have power to lay and collect taxes, duties, imposts and excises, \
to pay the debts and provide for the common defence and general welfare of the United States; but all duties, \
imposts and excises shall be uniform throughout the United States. To borrow money on the credit of the United \
States; to regulate commerce with foreign nations, and among the several states, and with the Indian tribes.";

#[test]
fn quantize_writes_a_gguf_that_generates_like_in_place_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-q8_0.gguf");
    let report = stdout_json(&dynexec(&[
        "quantize",
        "smollm2-135m-instruct",
        "--to",
        "q8_0",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(report["format"], "q8_0");
    assert!(out.exists());
    let args = [
        "generate",
        "--json",
        "--prompt",
        "The three primary colors are",
        "-n",
        "8",
    ];
    let from_file = stdout_json(&dynexec(
        &[&args[..], &["-m", out.to_str().unwrap()]].concat(),
    ));
    let in_place = stdout_json(&dynexec(&[&args[..], &["--quant", "q8_0"]].concat()));
    assert_eq!(from_file["token_ids"], in_place["token_ids"]);

    assert_clear_error(
        &dynexec(&[
            "quantize",
            "smollm2-135m-instruct",
            "--to",
            "q3_k",
            "--out",
            "x.gguf",
        ]),
        "unknown quantization",
    );
    assert_clear_error(
        &dynexec(&[
            "quantize",
            "smollm2-135m-instruct",
            "--to",
            "q8_0",
            "--out",
            "x.bin",
        ]),
        ".gguf",
    );
    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(&out).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    assert_clear_error(
        &dynexec(&[
            "quantize",
            truncated.to_str().unwrap(),
            "--to",
            "q4_0",
            "--out",
            dir.path().join("y.gguf").to_str().unwrap(),
        ]),
        "truncated or corrupt",
    );
}

#[test]
fn eval_perplexity_reports_json() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, SAMPLE_TEXT).unwrap();
    let report = stdout_json(&dynexec(&[
        "--quant",
        "f32",
        "eval",
        "perplexity",
        "--text",
        text.to_str().unwrap(),
        "--context",
        "32",
        "--stride",
        "16",
        "--json",
    ]));
    let ppl = report["perplexity"].as_f64().unwrap();
    assert!(ppl > 1.0 && ppl < 1000.0, "{report}");
    assert!(report["tokens"].as_u64().unwrap() > 50);
    assert_eq!(report["quant"], "f32");
    assert_clear_error(
        &dynexec(&["eval", "perplexity", "--text", "/nonexistent.txt"]),
        "dynexec data path sotu",
    );
    assert_clear_error(
        &dynexec(&[
            "eval",
            "perplexity",
            "--text",
            text.to_str().unwrap(),
            "--stride",
            "0",
        ]),
        "--stride",
    );
}

#[test]
fn bench_quant_reports_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, SAMPLE_TEXT).unwrap();
    let report = stdout_json(&dynexec(&[
        "bench",
        "quant",
        "--json",
        "--formats",
        "f32,q8_0",
        "--text",
        text.to_str().unwrap(),
        "--eval-tokens",
        "48",
        "--context",
        "32",
        "--stride",
        "32",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--runs",
        "1",
        "--warmup",
        "0",
    ]));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        for key in [
            "quant",
            "weights_bytes",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "perplexity",
        ] {
            assert!(row.get(key).is_some(), "missing {key} in {row}");
        }
    }
    assert!(
        rows[1]["weights_bytes"].as_u64().unwrap() < rows[0]["weights_bytes"].as_u64().unwrap()
    );
}

#[test]
fn bench_quant_on_the_encoder_reports_cosine_and_speed() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, SAMPLE_TEXT).unwrap();
    let report = stdout_json(&dynexec(&[
        "bench",
        "quant",
        "-m",
        "minilm-l6",
        "--json",
        "--formats",
        "f32,q8_0",
        "--text",
        text.to_str().unwrap(),
        "--sentences",
        "4",
        "--runs",
        "1",
        "--warmup",
        "0",
    ]));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!((rows[0]["cosine_vs_f32"].as_f64().unwrap() - 1.0).abs() < 1e-6);
    let q8 = rows[1]["cosine_vs_f32"].as_f64().unwrap();
    assert!(q8 > 0.99 && q8 <= 1.0 + 1e-6, "{q8}");
    assert!(rows[1]["sentences_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn generate_with_a_draft_matches_plain_greedy_and_reports_speculation() {
    let prompt = "List the days of the week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Again: Monday,";
    let base = [
        "generate",
        "--json",
        "--quant",
        "q8_0",
        "--prompt",
        prompt,
        "-n",
        "16",
        "--ignore-eos",
    ];
    let plain = stdout_json(&dynexec(&base));
    for (draft, lookahead, extra) in [
        ("ngram:3,8", "fixed:4", &[][..]),
        ("self-quant:q4_0", "heuristic", &[]),
        ("self-layers:6", "confidence", &[]),
        // A chain, and a draft model converted at load (the target itself, as q4_0).
        ("ngram:3,8+self-layers:6", "fixed:4", &[]),
        (
            "smollm2-135m-instruct",
            "heuristic",
            &["--draft-quant", "q4_0"],
        ),
    ] {
        let out = stdout_json(&dynexec(
            &[
                &base[..],
                &["--draft", draft, "--lookahead", lookahead],
                extra,
            ]
            .concat(),
        ));
        assert_eq!(
            out["token_ids"], plain["token_ids"],
            "{draft} / {lookahead}"
        );
        for key in [
            "draft",
            "lookahead",
            "acceptance_rate",
            "mean_accepted_length",
            "draft_forwards",
            "target_forwards",
        ] {
            assert!(out.get(key).is_some(), "missing {key}: {out}");
        }
        assert!(out["target_forwards"].as_u64().unwrap() <= 17);
    }
    assert!(plain.get("draft").is_none());
    assert_clear_error(
        &dynexec(&["generate", "--prompt", "x", "--draft", "self-layers:99"]),
        "self-layers:E",
    );
    assert_clear_error(
        &dynexec(&["generate", "--prompt", "x", "--draft", "ngram:a,b"]),
        "ngram:N,K",
    );
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--prompt",
            "x",
            "--draft",
            "ngram",
            "--lookahead",
            "fixed:0",
        ]),
        "fixed:K",
    );
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--prompt",
            "x",
            "--draft",
            "ngram",
            "--repeat-penalty",
            "1.2",
        ]),
        "--repeat-penalty",
    );
    assert_clear_error(
        &dynexec(&["generate", "--prompt", "x", "--draft", "minilm-l6"]),
        "llama-family",
    );
}

#[test]
fn bench_speculative_compares_drafters_with_plain_decoding() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("truthfulqa.jsonl"),
        "{\"question\": \"What is the capital of France?\"}\n",
    )
    .unwrap();
    let article = SAMPLE_TEXT.replace('"', "'");
    std::fs::write(
        dir.path().join("xsum.jsonl"),
        format!("{{\"document\": \"{article}\", \"summary\": \"x\"}}\n"),
    )
    .unwrap();
    let report = stdout_json(&dynexec(&[
        "bench",
        "speculative",
        "--json",
        "--target-quant",
        "q8_0",
        "--draft",
        "ngram:3,10",
        "--lookahead",
        "fixed:4",
        "--lookahead",
        "heuristic",
        "--questions",
        "1",
        "--articles",
        "1",
        "--max-tokens",
        "12",
        "--prompts-dir",
        dir.path().to_str().unwrap(),
    ]));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        2 * (1 + 2),
        "plain + 2 controllers, for each prompt set"
    );
    for row in rows {
        for key in [
            "draft",
            "lookahead",
            "target_quant",
            "tokens_per_s",
            "speedup",
            "acceptance_rate",
            "identical_to_plain",
        ] {
            assert!(row.get(key).is_some(), "missing {key} in {row}");
        }
        assert_eq!(row["identical_to_plain"], true, "{row}");
    }
    assert_clear_error(
        &dynexec(&["bench", "speculative", "--prompts-dir", "/nonexistent"]),
        "neither a folder nor a data set",
    );
}

/// `--compare-llama-cpp`, repeated, runs each llama-bench build interleaved with dynexec and
/// reports a ratio to each; fake llama-bench scripts print llama-bench's JSON with known rates.
#[cfg(unix)]
#[test]
fn bench_generate_compares_several_llama_cpp_builds_in_one_run() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fake = |build: &str, pp: f64, tg: f64| {
        let bin = dir.path().join(build).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let path = bin.join("llama-bench");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho '[{{\"n_prompt\": 8, \"n_gen\": 0, \"avg_ts\": {pp}}}, {{\"n_prompt\": 0, \"n_gen\": 4, \"avg_ts\": {tg}}}]'\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (avx2, avx512) = (
        fake("build", 100.0, 50.0),
        fake("build-avx512", 200.0, 80.0),
    );
    let report =
        short_bench_generate(&["--compare-llama-cpp", &avx2, "--compare-llama-cpp", &avx512]);
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["implementation"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "dynexec",
            "llama.cpp (llama-bench)",
            "llama.cpp (build-avx512)"
        ]
    );
    assert_eq!(rows[2]["prefill_tokens_per_s"].as_f64().unwrap(), 200.0);
    assert_eq!(rows[2]["decode_tokens_per_s"].as_f64().unwrap(), 80.0);
    let ours = &rows[0];
    let ratios = report["llama_cpp_ratios"].as_array().unwrap();
    assert_eq!(ratios.len(), 2);
    for (ratio, (pp, tg)) in ratios.iter().zip([(100.0, 50.0), (200.0, 80.0)]) {
        let expected = ours["prefill_tokens_per_s"].as_f64().unwrap() / pp;
        assert!((ratio["prefill_ratio"].as_f64().unwrap() - expected).abs() < 1e-9);
        let expected = ours["decode_tokens_per_s"].as_f64().unwrap() / tg;
        assert!((ratio["decode_ratio"].as_f64().unwrap() - expected).abs() < 1e-9);
    }
    assert_eq!(
        report["prefill_ratio_vs_llama_cpp"],
        ratios[0]["prefill_ratio"]
    );
    assert_clear_error(
        &dynexec(&[
            "bench",
            "generate",
            "--compare-llama-cpp",
            "/nonexistent/llama-bench",
        ]),
        "no such file",
    );
}

/// `-c/--ctx-size` caps the context: a prompt past the cap is refused as past the context,
/// a cap past the model's own is refused by name, and within the cap nothing changes.
#[test]
fn ctx_size_caps_the_context() {
    let prompt = "one two three four five six seven eight nine ten eleven twelve";
    let capped = dynexec(&["generate", "-c", "8", "--prompt", prompt, "-n", "2"]);
    assert_clear_error(&capped, "context");
    let too_big = dynexec(&[
        "generate",
        "--ctx-size",
        "100000",
        "--prompt",
        "hi",
        "-n",
        "2",
    ]);
    assert_clear_error(&too_big, "--ctx-size must be between 1 and 8192");
    let plain = stdout_json(&dynexec(&[
        "--json", "generate", "--prompt", prompt, "-n", "4",
    ]));
    let roomy = stdout_json(&dynexec(&[
        "--json", "generate", "-c", "64", "--prompt", prompt, "-n", "4",
    ]));
    assert_eq!(plain["text"], roomy["text"]);
}
