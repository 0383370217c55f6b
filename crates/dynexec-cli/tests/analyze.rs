//! `dynexec analyze` and `bench dsa` as a user runs them: output formats, the metrics'
//! defining properties on real hidden states, reruns from a saved trace, and clear errors.

mod common;

use common::{assert_clear_error, stdout_json};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dynexec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dynexec"))
        .args(args)
        .args(["--device", "cpu", "--quiet"])
        .current_dir(repo_root())
        .output()
        .expect("run dynexec")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn case(name: &str) -> String {
    repo_root()
        .join("tests/data/dsa-cases")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn matrix(json: &Value, metric: &str) -> Vec<Vec<f64>> {
    json["matrices"][metric]
        .as_array()
        .unwrap_or_else(|| panic!("no matrix for {metric}"))
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn compare_prints_every_metric_with_the_reference_values() {
    let x = case("02_lds_invariance/X.npy");
    let y_lin = case("02_lds_invariance/Y_lin.npy");
    let json = stdout_json(&dynexec(&[
        "analyze", "compare", &x, &y_lin, "--metric", "all", "--json",
    ]));
    // An invertible linear map of the same system: same dynamics, different geometry
    // (reference: Procrustes 0.6027, CKA 0.7225; DSA exactly 0 at full rank).
    assert!(json["dsa"]["angular"].as_f64().unwrap() < 1e-3, "{json}");
    assert!(json["dsa"]["euclidean"].as_f64().unwrap() < 1e-3);
    assert!(json["dsa"]["wasserstein"].as_f64().unwrap() < 1e-4);
    assert!(
        (json["procrustes"].as_f64().unwrap() - 0.6027).abs() < 1e-3,
        "{json}"
    );
    assert!(
        (json["cka"].as_f64().unwrap() - 0.7225).abs() < 1e-3,
        "{json}"
    );
    assert!(json["rsa"].as_f64().is_some());

    let only_dsa = stdout_json(&dynexec(&[
        "analyze",
        "compare",
        &x,
        &case("02_lds_invariance/Z_swapped.npy"),
        "--metric",
        "dsa",
        "--json",
    ]));
    let keys: Vec<&String> = only_dsa.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["dsa"]);
    assert!(
        only_dsa["dsa"]["angular"].as_f64().unwrap() > 0.1,
        "different frequencies"
    );
}

#[test]
fn compare_refuses_bad_files_and_settings() {
    let x = case("02_lds_invariance/X.npy");
    let readme = repo_root().join("README.md").to_string_lossy().into_owned();
    assert_clear_error(&dynexec(&["analyze", "compare", &readme, &x]), "not a .npy");
    assert_clear_error(
        &dynexec(&["analyze", "compare", "/nonexistent.npy", &x]),
        "nonexistent",
    );
    assert_clear_error(
        &dynexec(&["analyze", "compare", &x, &x, "--rank", "0"]),
        "--rank",
    );
    assert_clear_error(
        &dynexec(&["analyze", "compare", &x, &x, "--n-delays", "500"]),
        "too few",
    );
    assert_clear_error(
        &dynexec(&[
            "analyze",
            "compare",
            &x,
            &case("04_lorenz_noise_sweep/clean.npy"),
            "--metric",
            "cka",
        ]),
        "same samples",
    );
}

#[test]
fn analyze_traces_smollm2_and_reruns_from_the_trace() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_string_lossy().into_owned();
    let json = stdout_json(&dynexec(&[
        "analyze",
        "-p",
        "The river flows to the sea, and the sea",
        "-n",
        "24",
        "--out",
        &out,
        "--json",
    ]));
    let layers = json["layers"].as_array().unwrap().len();
    assert_eq!(layers, 31, "embeddings + 30 layers");
    for metric in ["dsa_angular", "procrustes_angular", "cka_linear"] {
        let m = matrix(&json, metric);
        assert_eq!(m.len(), layers);
        let self_value = if metric == "cka_linear" { 1.0 } else { 0.0 };
        for i in 0..layers {
            assert!((m[i][i] - self_value).abs() < 1e-9, "{metric} diagonal");
            for j in 0..layers {
                assert!(
                    m[i][j].is_finite() && (m[i][j] - m[j][i]).abs() < 1e-9,
                    "{metric} symmetric"
                );
            }
        }
        let last = json["vs_final"][metric].as_array().unwrap();
        assert!((last[layers - 1].as_f64().unwrap() - self_value).abs() < 1e-9);
    }
    // Geometry drifts with depth: the embeddings are further from the last layer than the
    // layer just before it.
    let procrustes = matrix(&json, "procrustes_angular");
    assert!(procrustes[0][layers - 1] > procrustes[layers - 2][layers - 1]);
    for file in [
        "layers-dsa_angular.png",
        "layers-cka_linear.csv",
        "analysis.json",
        "trace.safetensors",
        "trace.safetensors.json",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    let png = std::fs::read(dir.path().join("layers-procrustes_angular.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");

    // Rerun without the model, against the same trace: the same matrices, and every layer
    // identical to itself.
    let trace = dir
        .path()
        .join("trace.safetensors")
        .to_string_lossy()
        .into_owned();
    let rerun_dir = tempfile::tempdir().unwrap();
    let rerun = stdout_json(&dynexec(&[
        "analyze",
        "--trace",
        &trace,
        "--vs-trace",
        &trace,
        "--no-plots",
        "--out",
        &rerun_dir.path().to_string_lossy(),
        "--json",
    ]));
    assert_eq!(matrix(&rerun, "dsa_angular"), matrix(&json, "dsa_angular"));
    let rows = rerun["paired"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), layers);
    for row in rows {
        assert!(row["dsa_angular"].as_f64().unwrap() < 1e-3, "{row}");
        assert!(row["procrustes_angular"].as_f64().unwrap() < 1e-6, "{row}");
        assert!(
            (row["cka_linear"].as_f64().unwrap() - 1.0).abs() < 1e-9,
            "{row}"
        );
    }
    assert!(rerun_dir.path().join("paired.csv").is_file());
}

#[test]
fn analyze_compares_precisions_and_models_layer_by_layer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_string_lossy().into_owned();
    let prompt = "Once upon a time, in a small village by the sea,";
    let quant = stdout_json(&dynexec(&[
        "analyze",
        "-p",
        prompt,
        "-n",
        "16",
        "--quant",
        "f32",
        "--vs-quant",
        "q8_0",
        "--metric",
        "cka,procrustes",
        "--no-plots",
        "--out",
        &out,
        "--json",
    ]));
    let rows = quant["paired"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 31);
    for row in rows {
        let cka = row["cka_linear"].as_f64().unwrap();
        assert!((0.0..=1.0 + 1e-9).contains(&cka), "{row}");
    }
    // q8_0 stays close to f32: the last layer's geometry barely moves.
    assert!(
        rows[30]["cka_linear"].as_f64().unwrap() > 0.9,
        "{}",
        rows[30]
    );
    assert!(dir.path().join("trace-q8_0.safetensors").is_file());

    // The same model as the second system: every layer pairs with itself, and the states agree
    // up to float order (the replay runs all tokens in one pass, the trace decoded them one by
    // one).
    let same = stdout_json(&dynexec(&[
        "analyze",
        "-p",
        prompt,
        "-n",
        "16",
        "--vs-model",
        "smollm2-135m-instruct",
        "--metric",
        "cka",
        "--no-plots",
        "--out",
        &out,
        "--json",
    ]));
    for row in same["paired"]["rows"].as_array().unwrap() {
        assert_eq!(row["layer_a"], row["layer_b"]);
        assert!(
            (row["cka_linear"].as_f64().unwrap() - 1.0).abs() < 1e-6,
            "{row}"
        );
    }
    // Every layer against every layer: 31 x 31, the same-depth pairs on the diagonal, and
    // each layer's state most like its own counterpart's.
    let cross = &same["paired"]["cross"]["cka_linear"];
    let cross: Vec<Vec<f64>> = serde_json::from_value(cross.clone()).unwrap();
    assert_eq!((cross.len(), cross[0].len()), (31, 31));
    for (i, row) in cross.iter().enumerate() {
        assert!((row[i] - 1.0).abs() < 1e-6, "layer {i}: {}", row[i]);
        assert!(
            row.iter().all(|&v| v <= row[i] + 1e-9),
            "layer {i}: {row:?}"
        );
    }
    assert!(dir.path().join("cross-cka_linear.csv").is_file());
}

#[test]
fn analyze_by_verdict_compares_what_the_target_accepted_and_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_string_lossy().into_owned();
    let json = stdout_json(&dynexec(&[
        "--json",
        "analyze",
        "-m",
        "qwen2.5-coder-1.5b-instruct",
        "--vs-model",
        "qwen2.5-coder-0.5b-instruct",
        "--by-verdict",
        "--chat",
        "-p",
        "Tell me a short story about a lighthouse keeper.",
        "-n",
        "40",
        "--metric",
        "cka",
        "--permutations",
        "20",
        "--null",
        "shuffle",
        "--out",
        &out,
    ]));
    let verdicts = &json["verdicts"];
    let (accepted, rejected) = (
        verdicts["accepted_positions"].as_u64().unwrap(),
        verdicts["rejected_positions"].as_u64().unwrap(),
    );
    assert!(accepted >= 2 && rejected >= 2, "{verdicts}");
    assert!(
        accepted + rejected < 40,
        "the first token and bonus tokens have no verdict"
    );
    for (report, layers) in [("in_target", 29), ("in_draft", 25)] {
        let report = &verdicts[report];
        assert_eq!(report["sizes"], serde_json::json!([accepted, rejected]));
        assert_eq!(report["null"], "shuffle", "--null overrides the rotation");
        let rows = report["layers"].as_array().unwrap();
        assert_eq!(rows.len(), layers);
        for row in rows {
            for field in ["dsa_p", "dsa_q", "centroid_p"] {
                let p = row[field].as_f64().unwrap();
                assert!(p > 0.0 && p <= 1.0, "{field}: {row}");
            }
            assert!(row["dsa_angular"].as_f64().unwrap() >= 0.0);
        }
    }
    // Draft against target: every layer pair, heatmaps for both comparisons.
    let cross: Vec<Vec<f64>> =
        serde_json::from_value(json["paired"]["cross"]["cka_linear"].clone()).unwrap();
    assert_eq!((cross.len(), cross[0].len()), (29, 25));
    for file in [
        "verdicts-target.csv",
        "verdicts-draft-dsa.png",
        "cross-cka_linear.png",
        "trace-vs-model.safetensors",
    ] {
        assert!(dir.path().join(file).is_file(), "{file}");
    }
    // --by-verdict needs a draft model.
    let out = dynexec(&["analyze", "-p", "Hi", "--by-verdict"]);
    assert_clear_error(&out, "--vs-model");
}

#[test]
fn analyze_exits_compares_early_with_full_depth_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_string_lossy().into_owned();
    let json = stdout_json(&dynexec(&[
        "--json",
        "analyze",
        "exits",
        "--model",
        "minilm-l6-reviews",
        "--limit",
        "400",
        "--permutations",
        "10",
        "--out",
        &out,
    ]));
    let counts: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(json["exit_counts"].clone()).unwrap();
    assert_eq!(counts.values().sum::<u64>(), 400);
    let inputs = json["inputs"].as_u64().unwrap();
    assert_eq!(inputs + json["skipped_short"].as_u64().unwrap(), 400);
    let comparison = &json["comparison"];
    let sizes: Vec<u64> = serde_json::from_value(comparison["sizes"].clone()).unwrap();
    assert_eq!(sizes.iter().sum::<u64>(), inputs);
    assert_eq!(
        comparison["null"], "shuffle",
        "independent reviews are shuffled"
    );
    assert_eq!(
        comparison["layers"].as_array().unwrap().len(),
        7,
        "embeddings and 6 layers"
    );
    assert!(dir.path().join("exits-classifier-dsa.png").is_file());
    assert!(dir.path().join("exits.json").is_file());

    // Per-token exit on a decoder: each adapter's exited tokens against those that went on.
    let json = stdout_json(&dynexec(&[
        "--json",
        "analyze",
        "exits",
        "--model",
        "smollm2-135m-instruct",
        "--early-exit",
        "classifier:0.8",
        "--chat",
        "-p",
        "Explain photosynthesis.",
        "-p",
        "Name three rivers and where they flow.",
        "-p",
        "Write a short poem about the sea.",
        "-n",
        "64",
        "--permutations",
        "10",
        "--no-plots",
        "--out",
        &out,
    ]));
    let by_layer = json["by_exit_layer"].as_object().unwrap();
    assert!(!by_layer.is_empty(), "{json}");
    for (layer, report) in by_layer {
        let layer: u64 = layer.parse().unwrap();
        let exited = report["sizes"][0].as_u64().unwrap();
        assert_eq!(
            json["exit_counts"][layer.to_string()].as_u64().unwrap() >= exited,
            true
        );
        assert_eq!(report["layers"].as_array().unwrap().len(), 31);
        assert_eq!(report["null"], "rotate", "positions of a text are rotated");
    }
    // Without prompts the decoder analysis says what it needs.
    let out = dynexec(&[
        "analyze",
        "exits",
        "--model",
        "smollm2-135m-instruct",
        "--early-exit",
        "classifier:0.8",
    ]);
    assert_clear_error(&out, "--prompt");
}

#[test]
fn analyze_traces_every_exit_of_the_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_string_lossy().into_owned();
    let text = "The committee met on Tuesday to discuss the budget for the coming year. \
        Members argued about schools, roads and hospitals, and agreed to meet again next week \
        after the treasury publishes its forecast.";
    let json = stdout_json(&dynexec(&[
        "analyze",
        "-m",
        "minilm-l6",
        "-p",
        text,
        "--out",
        &out,
        "--no-plots",
        "--json",
    ]));
    assert_eq!(
        json["layers"].as_array().unwrap().len(),
        7,
        "embeddings + 6 layers"
    );
    assert_eq!(json["features"], 384);
    let cka = matrix(&json, "cka_linear");
    assert!(cka.iter().flatten().all(|v| (0.0..=1.0 + 1e-9).contains(v)));
    // MiniLM's tokenizer.json cuts encodings to 128 tokens: said, not silent.
    let long_text = "word ".repeat(600);
    let cut = dynexec(&[
        "analyze",
        "-m",
        "minilm-l6",
        "-p",
        &long_text,
        "--out",
        &out,
        "--no-plots",
        "--metric",
        "cka",
    ]);
    assert!(
        cut.status.success(),
        "{}",
        String::from_utf8_lossy(&cut.stderr)
    );
    assert!(String::from_utf8_lossy(&cut.stderr).contains("cut to the 128 tokens"));
}

#[test]
fn analyze_needs_a_prompt_or_a_trace() {
    assert_clear_error(
        &dynexec(&["analyze", "--out", "/tmp/dynexec-analyze-none"]),
        "--prompt",
    );
    assert_clear_error(
        &dynexec(&["analyze", "--trace", "/nonexistent/trace.safetensors"]),
        "reading trace",
    );
}

#[test]
fn bench_dsa_times_every_reference_pair() {
    let json = stdout_json(&dynexec(&["bench", "dsa", "--runs", "1", "--json"]));
    let rows = json["rows"].as_array().unwrap();
    assert!(rows.len() >= 17, "{json}");
    for row in rows {
        assert!(row["seconds"].as_f64().unwrap() > 0.0);
        assert!(row["reference_seconds"].as_f64().is_some());
        assert!(row["angular"].as_f64().unwrap().is_finite());
    }
    assert_eq!(json["matrix_systems"], 10);
}
