//! Adaptive-step diffusion from the command line: `diffusion train | label | train-steps`,
//! `diffuse` and `bench diffusion` on a tiny model trained here, the committed model, and
//! clear errors.

mod common;

use common::{assert_clear_error, dynexec, small_fashion, stdout_json};
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn repo_prompts(split: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/unet-fashion-mnist")
        .join(format!("prompts-{split}.jsonl"))
}

#[test]
fn train_label_fit_steps_diffuse_and_bench_a_tiny_model() {
    let data = small_fashion(64, 40);
    let out = tempfile::tempdir().unwrap();
    let model = out.path().join("unet");
    let trained = stdout_json(&dynexec(&[
        "--json",
        "diffusion",
        "train",
        "--data",
        s(data.path()),
        "--prompts",
        s(&repo_prompts("train")),
        "--test-prompts",
        s(&repo_prompts("test")),
        "--out",
        s(&model),
        "--channels",
        "8,16",
        "--groups",
        "4",
        "--embed-dim",
        "16",
        "--steps",
        "3",
        "--batch-size",
        "8",
    ]));
    assert!(trained["final_loss"].as_f64().unwrap().is_finite());
    for file in [
        "card.json",
        "unet.safetensors",
        "prompts-train.jsonl",
        "prompts-test.jsonl",
    ] {
        assert!(model.join(file).exists(), "{file} missing");
    }

    // Before a predictor exists, `--steps predicted` says how to make one.
    let png = out.path().join("grid.png");
    let args = [
        "diffuse",
        "--model",
        s(&model),
        "--prompt",
        "a sneaker",
        "--out",
        s(&png),
    ];
    assert_clear_error(&dynexec(&args), "diffusion label");

    let labels = out.path().join("labels.jsonl");
    let status = dynexec(&[
        "diffusion",
        "label",
        "--model",
        s(&model),
        "--count",
        "3",
        "--grid",
        "2,4,8",
        "--out",
        s(&labels),
    ]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&labels)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for line in &lines {
        // The reference is the grid's last count, so its own SSIM is exactly 1.
        let ssim = line["ssim"].as_array().unwrap();
        assert_eq!(ssim.last().unwrap().as_f64().unwrap(), 1.0);
        assert!([2, 4, 8].contains(&line["steps"].as_u64().unwrap()));
    }
    let fitted = stdout_json(&dynexec(&[
        "--json",
        "diffusion",
        "train-steps",
        "--labels",
        s(&labels),
        "--model",
        s(&model),
        "--epochs",
        "20",
    ]));
    assert_eq!(fitted["grid"], serde_json::json!([2, 4, 8]));

    let result = stdout_json(&dynexec(&[
        "--json",
        "diffuse",
        "--model",
        s(&model),
        "--prompt",
        "a sneaker",
        "--n",
        "2",
        "--out",
        s(&png),
    ]));
    assert_eq!(result["prompt"], "a sneaker");
    assert!(result["steps_policy"]
        .as_str()
        .unwrap()
        .starts_with("predicted"));
    let used = result["steps_used"].as_array().unwrap();
    assert_eq!(used.len(), 2);
    assert!(used
        .iter()
        .all(|n| [2, 4, 8].contains(&n.as_u64().unwrap())));
    assert_eq!(result["outputs"][0], s(&png));
    let grid = image::open(&png).unwrap();
    // Two 28-pixel images at scale 4 with a 2-pixel gap.
    assert_eq!((grid.width(), grid.height()), (2 * 112 + 2, 112));

    let converged = stdout_json(&dynexec(&[
        "--json",
        "diffuse",
        "--model",
        s(&model),
        "--prompt",
        "a coat",
        "--steps",
        "converge:1e9:1",
        "--max-steps",
        "6",
        "--out",
        s(&png),
    ]));
    // A threshold nothing can miss converges at the minimum of 3 steps, then finishes in 1.
    assert_eq!(converged["steps_used"], serde_json::json!([4]));

    let bench = stdout_json(&dynexec(&[
        "--json",
        "bench",
        "diffusion",
        "--model",
        s(&model),
        "--count",
        "2",
        "--seeds",
        "1",
        "--reference-steps",
        "4",
        "--policies",
        "predicted,converge,2",
        "--data",
        s(data.path()),
        "--fid-reference",
        "20",
    ]));
    let rows = bench["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(names[0], "fixed:4");
    assert_eq!(names.len(), 4);
    for key in [
        "mean_steps",
        "seconds",
        "ssim_to_full",
        "class_consistency",
        "fid",
    ] {
        assert!(rows.iter().all(|r| r[key].as_f64().is_some()), "{key}");
    }
    // The baseline is its own reference.
    assert!((rows[0]["ssim_to_full"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    assert_eq!(rows[3]["mean_steps"].as_f64().unwrap(), 2.0);
}

#[test]
fn bad_diffusion_input_gets_clear_errors() {
    let args = |steps: &str| dynexec(&["diffuse", "--prompt", "x", "--steps", steps]);
    assert_clear_error(&args("fast"), "predicted[:Q] or converge[:EPS");
    assert_clear_error(&args("converge:-2"), "not a positive number");
    assert_clear_error(
        &dynexec(&["diffuse", "--model", "/nonexistent/unet", "--prompt", "x"]),
        "/nonexistent/unet",
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("labels.jsonl");
    std::fs::write(&bad, "{not json\n").unwrap();
    assert_clear_error(
        &dynexec(&[
            "diffusion",
            "train-steps",
            "--labels",
            s(&bad),
            "--model",
            s(dir.path()),
        ]),
        "not a `diffusion label` line",
    );
    assert_clear_error(
        &dynexec(&["diffusion", "label", "--grid", "10,5", "--out", s(&bad)]),
        "increasing",
    );
}
