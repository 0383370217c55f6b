//! `dynexec spec` and the speculative options it feeds: FR-Spec draft vocabularies, DISCO
//! lookahead classifiers (trained, used, refused for another pair), and llama.cpp's
//! speculative tool as a `bench speculative` row.

mod common;

use common::{assert_clear_error, dynexec, stdout_json};

const PROMPT: &str = "List the days of the week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Again: Monday,";

fn generate(extra: &[&str]) -> serde_json::Value {
    let base = [
        "generate",
        "--json",
        "--quant",
        "q8_0",
        "--prompt",
        PROMPT,
        "-n",
        "16",
        "--ignore-eos",
    ];
    stdout_json(&dynexec(&[&base[..], extra].concat()))
}

/// HumanEval-shaped problems for training (the first problems of the file).
fn problems(dir: &std::path::Path) {
    let lines: Vec<String> = [
        "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n",
        "def is_even(n):\n    \"\"\"Return True when n is even.\"\"\"\n",
        "def reverse(s):\n    \"\"\"Return s reversed.\"\"\"\n",
        "def largest(xs):\n    \"\"\"Return the largest element of xs.\"\"\"\n",
    ]
    .iter()
    .map(|p| serde_json::json!({ "prompt": p }).to_string())
    .collect();
    std::fs::write(dir.join("humaneval.jsonl"), lines.join("\n") + "\n").unwrap();
}

#[test]
fn a_ranked_draft_vocabulary_keeps_the_output_and_refuses_other_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(
        &corpus,
        PROMPT.repeat(20) + " The quick brown fox jumps over the lazy dog.",
    )
    .unwrap();
    let ranking = dir.path().join("ranking.json");
    let out = dynexec(&[
        "spec",
        "rank-tokens",
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        ranking.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = generate(&[]);
    // A vocabulary of the corpus's 20 most frequent tokens: the draft proposes only those.
    let vocab = format!("20:{}", ranking.display());
    let narrowed = generate(&[
        "--draft",
        "self-quant:q4_0",
        "--lookahead",
        "fixed:3",
        "--draft-vocab",
        &vocab,
    ]);
    assert_eq!(narrowed["token_ids"], plain["token_ids"]);
    assert!(
        narrowed["draft"].as_str().unwrap().contains("vocab:"),
        "the draft's name records its vocabulary: {}",
        narrowed["draft"]
    );
    // Qwen2.5's committed ranking does not fit SmolLM2's tokenizer.
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--prompt",
            "x",
            "--draft",
            "self-quant",
            "--draft-vocab",
            "1000",
        ]),
        "rank-tokens",
    );
    assert_clear_error(
        &dynexec(&["generate", "--prompt", "x", "--draft-vocab", "1000"]),
        "--draft",
    );
    // A draft from another family: refused, naming both models.
    let other = dynexec(&[
        "generate",
        "-m",
        "qwen2.5-coder-0.5b-instruct",
        "--prompt",
        "x",
        "--draft",
        "smollm2-135m-instruct",
    ]);
    assert_clear_error(&other, "tokenizer");
    let message = String::from_utf8_lossy(&other.stderr);
    assert!(
        message.contains("smollm2-135m-instruct")
            && message.contains("qwen2.5-coder-0.5b-instruct"),
        "{message}"
    );
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--prompt",
            "x",
            "--draft",
            "ngram",
            "--draft-vocab",
            "10",
        ]),
        "--draft-vocab",
    );
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--prompt",
            "x",
            "--draft",
            "self-quant",
            "--draft-vocab",
            "0",
        ]),
        "N[:RANKING]",
    );
}

#[test]
fn a_trained_disco_lookahead_keeps_the_output_and_refuses_another_pair() {
    let dir = tempfile::tempdir().unwrap();
    problems(dir.path());
    let model = dir.path().join("disco");
    let out = dynexec(&[
        "spec",
        "train-lookahead",
        "--draft",
        "self-layers:10",
        "--problems",
        "4",
        "--max-tokens",
        "24",
        "--max-lookahead",
        "4",
        "--prompts-dir",
        dir.path().to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("card.json")).unwrap()).unwrap();
    for key in [
        "target",
        "draft",
        "features",
        "classifier",
        "threshold",
        "costs",
        "report",
        "command",
    ] {
        assert!(card.get(key).is_some(), "missing {key} in {card}");
    }
    assert_eq!(card["draft"], "self-layers:10");
    let plain = generate(&[]);
    let lookahead = format!("disco:{}", model.display());
    let disco = generate(&["--draft", "self-layers:10", "--lookahead", &lookahead]);
    assert_eq!(disco["token_ids"], plain["token_ids"]);
    assert_eq!(disco["lookahead"], "disco");
    // Another draft for the same target: refused, naming both drafts.
    let other = dynexec(&[
        "generate",
        "--prompt",
        "x",
        "--draft",
        "self-layers:6",
        "--lookahead",
        &lookahead,
    ]);
    assert_clear_error(&other, "train-lookahead");
    let message = String::from_utf8_lossy(&other.stderr);
    assert!(
        message.contains("self-layers:10") && message.contains("self-layers:6"),
        "{message}"
    );
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--prompt",
            "x",
            "--draft",
            "ngram",
            "--lookahead",
            "disco:/nonexistent/card.json",
        ]),
        "/nonexistent",
    );
    assert_clear_error(
        &dynexec(&[
            "spec",
            "train-lookahead",
            "--draft",
            "ngram",
            "--problems",
            "90",
            "--out",
            "x",
        ]),
        "--problems",
    );
}

/// `--compare-llama-cpp` runs llama.cpp's speculative tool on the same prompts, one row per
/// fixed lookahead; a fake tool prints its log lines.
#[cfg(unix)]
#[test]
fn bench_speculative_runs_llama_cpp_speculation_side_by_side() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("truthfulqa.jsonl"),
        "{\"question\": \"What is the capital of France?\"}\n",
    )
    .unwrap();
    let tool = dir.path().join("llama-speculative-simple");
    std::fs::write(
        &tool,
        "#!/bin/sh\necho 'I decoded   10 tokens in    0.500 seconds, speed:   20.000 t/s' >&2\necho 'I n_drafted = 8' >&2\necho 'I n_accept  = 6' >&2\n",
    )
    .unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let report = stdout_json(&dynexec(&[
        "bench",
        "speculative",
        "--json",
        "--target-quant",
        "q8_0",
        "--draft",
        "smollm2-135m-instruct",
        "--draft-quant",
        "q4_0",
        "--lookahead",
        "fixed:2",
        "--questions",
        "1",
        "--articles",
        "0",
        "--max-tokens",
        "8",
        "--verify-rows",
        "3",
        "--prompts-dir",
        dir.path().to_str().unwrap(),
        "--compare-llama-cpp",
        tool.to_str().unwrap(),
    ]));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "plain, the draft model, llama.cpp: {rows:?}");
    let llama = &rows[2];
    assert_eq!(llama["engine"], "llama.cpp");
    assert_eq!(llama["lookahead"], "n-max:2");
    assert_eq!(llama["tokens_per_s"].as_f64().unwrap(), 20.0);
    assert_eq!(llama["acceptance_rate"].as_f64().unwrap(), 0.75);
    assert_eq!(rows[1]["identical_to_plain"], true);
    assert_eq!(rows[1]["draft"], "smollm2-135m-instruct@q4_0");
    let verification = report["verification"].as_array().unwrap();
    assert_eq!(verification.len(), 3);
    assert_eq!(verification[0]["fraction_of_step"].as_f64().unwrap(), 1.0);
    assert_clear_error(
        &dynexec(&[
            "bench",
            "speculative",
            "--draft",
            "ngram",
            "--prompts-dir",
            dir.path().to_str().unwrap(),
            "--compare-llama-cpp",
            tool.to_str().unwrap(),
        ]),
        "draft model",
    );
}
