//! Early exit from the command line: `exits train`, `exits calibrate`, `classify` and
//! `bench exits` on small slices of the real data sets, the committed models, and clear errors.

mod common;

use common::{assert_clear_error, data_dir, dynexec, small_fashion, stdout_json};
use serde_json::Value;
use std::path::Path;

/// The first `n` reviews of each split, in a fresh folder.
fn small_reviews(n: usize) -> tempfile::TempDir {
    let source = data_dir("reviews");
    let dir = tempfile::tempdir().unwrap();
    for split in ["train", "val", "test"] {
        let text = std::fs::read_to_string(source.join(format!("{split}.jsonl"))).unwrap();
        let head: Vec<&str> = text.lines().take(n).collect();
        std::fs::write(dir.path().join(format!("{split}.jsonl")), head.join("\n")).unwrap();
    }
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_calibrate_classify_and_bench_a_text_model() {
    let data = small_reviews(48);
    let out = tempfile::tempdir().unwrap();
    let model = out.path().join("model");
    let trained = stdout_json(&dynexec(&[
        "exits",
        "train",
        "--data",
        s(data.path()),
        "--out",
        s(&model),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--json",
    ]));
    let card = &trained["card"];
    assert_eq!(card["layers"], 6);
    assert_eq!(card["training"]["mode"], "frozen");
    assert_eq!(card["labels"], serde_json::json!(["fresh", "rotten"]));
    assert_eq!(
        card["accuracy"]["test_per_exit"].as_array().unwrap().len(),
        6
    );
    assert!(card["training"]["command"]
        .as_str()
        .unwrap()
        .contains("exits train"));

    let calibrated = stdout_json(&dynexec(&[
        "exits",
        "calibrate",
        s(&model),
        "--data",
        s(data.path()),
        "--max-accuracy-drop",
        "0.05",
        "--json",
    ]));
    let c = &calibrated["calibration"];
    let drop = c["val_full_accuracy"].as_f64().unwrap() - c["val_accuracy"].as_f64().unwrap();
    assert!(
        drop <= 0.05 + 1e-9,
        "calibration lost {drop} on its own split"
    );
    assert_eq!(c["policy"]["policy"], "confidence");
    let card: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("card.json")).unwrap()).unwrap();
    let thresholds = |policy: &Value| -> Vec<f32> {
        let t = policy["thresholds"].as_array().unwrap().iter();
        t.map(|x| x.as_f64().unwrap() as f32).collect()
    };
    assert_eq!(
        thresholds(&card["calibration"]["policy"]),
        thresholds(&c["policy"]),
        "recorded in the card"
    );

    let reviews = out.path().join("reviews.txt");
    std::fs::write(&reviews, "Dull and far too long.\n\nA triumph.\n").unwrap();
    let classified = stdout_json(&dynexec(&[
        "classify",
        "--model",
        s(&model),
        "--file",
        s(&reviews),
        "Witty and warm.",
        "--json",
    ]));
    let results = classified["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "one argument and two non-empty lines");
    assert_eq!(results[0]["input"], "Witty and warm.");
    for r in results {
        assert!(["fresh", "rotten"].contains(&r["label"].as_str().unwrap()));
        let exit = r["exit_layer"].as_u64().unwrap();
        assert!((1..=6).contains(&exit) && r["layers_total"] == 6);
        assert!(r["confidence"].as_f64().unwrap() >= 0.5);
    }
    let fixed = stdout_json(&dynexec(&[
        "classify",
        "--model",
        s(&model),
        "--policy",
        "fixed:2",
        "Witty and warm.",
        "--json",
    ]));
    assert_eq!(fixed["results"][0]["exit_layer"], 2);

    let bench = stdout_json(&dynexec(&[
        "bench",
        "exits",
        "--model",
        s(&model),
        "--data",
        s(data.path()),
        "--timed-inputs",
        "4",
        "--runs",
        "1",
        "--policies",
        "calibrated,entropy,fixed:3",
        "--json",
    ]));
    let rows = bench["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["full", "calibrated", "entropy", "fixed:3"]);
    assert_eq!(rows[0]["batch1_speedup"], 1.0);
    assert_eq!(rows[0]["mean_exit_layer"], 6.0);
    assert_eq!(rows[3]["mean_exit_layer"], 3.0);
    assert_eq!(rows[3]["layers_saved_pct"], 50.0);
    for r in rows {
        for key in [
            "task",
            "threshold",
            "accuracy",
            "batch1_speedup",
            "throughput_per_s",
        ] {
            assert!(!r[key].is_null(), "{key} in {r}");
        }
    }
}

#[test]
fn joint_training_saves_the_fine_tuned_encoder() {
    let data = small_reviews(12);
    let out = tempfile::tempdir().unwrap();
    let trained = stdout_json(&dynexec(&[
        "exits",
        "train",
        "--data",
        s(data.path()),
        "--out",
        s(out.path()),
        "--mode",
        "joint",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--json",
    ]));
    assert_eq!(trained["card"]["backbone_in_weights"], true);
    let weights = candle_core::safetensors::load(
        out.path().join("exits.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(weights
        .keys()
        .any(|k| k.contains("encoder.layer.5.output.dense.weight")));
    assert!(weights.keys().any(|k| k.starts_with("exits.5.classifier")));
    // The encoder was fine-tuned: its weights moved away from all-MiniLM-L6-v2's.
    let mut hub = dynexec_hub::Hub::from_env().unwrap();
    hub.progress = false;
    let base = hub.resolve("minilm-l6").unwrap();
    let base = candle_core::safetensors::load(
        base.find("model.safetensors").unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let name = weights
        .keys()
        .find(|k| k.ends_with("encoder.layer.5.output.dense.weight"))
        .unwrap();
    let moved = (&weights[name] - &base[name])
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(moved.to_scalar::<f32>().unwrap() > 0.0);
    let classified = stdout_json(&dynexec(&[
        "classify",
        "--model",
        s(out.path()),
        "--policy",
        "full",
        "Fine.",
        "--json",
    ]));
    assert_eq!(classified["results"][0]["exit_layer"], 6);
}

#[test]
fn a_cnn_trains_from_scratch_and_classifies_png_files() {
    let data = small_fashion(320, 64);
    let out = tempfile::tempdir().unwrap();
    let model = out.path().join("cnn");
    let names = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot";
    let trained = stdout_json(&dynexec(&[
        "exits",
        "train",
        "--data",
        s(data.path()),
        "--backbone",
        "cnn",
        "--out",
        s(&model),
        "--epochs",
        "2",
        "--val-size",
        "64",
        "--labels",
        names,
        "--json",
    ]));
    assert_eq!(trained["card"]["kind"], "image");
    assert_eq!(trained["card"]["layers"], 3);
    assert_eq!(trained["card"]["data"]["train"], 256);
    // Two epochs on 256 images already beat chance (10%) by far at the last exit.
    let last = trained["card"]["accuracy"]["test_per_exit"][2]
        .as_f64()
        .unwrap();
    assert!(last > 0.3, "test accuracy {last}");

    // The first test image as a PNG.
    let images = std::fs::read(data.path().join("t10k-images-idx3-ubyte")).unwrap();
    let png = out.path().join("item.png");
    image::GrayImage::from_raw(28, 28, images[16..16 + 784].to_vec())
        .unwrap()
        .save(&png)
        .unwrap();
    let classified = stdout_json(&dynexec(&[
        "classify",
        "--model",
        s(&model),
        "--policy",
        "confidence:0",
        s(&png),
        "--json",
    ]));
    let r = &classified["results"][0];
    assert!(names.split(',').any(|n| n == r["label"]));
    assert_eq!(r["exit_layer"], 1);
    assert_eq!(r["layers_total"], 3);

    assert_clear_error(
        &dynexec(&["classify", "--model", s(&model), "no-such-image.png"]),
        "cannot read image no-such-image.png",
    );
    assert_clear_error(
        &dynexec(&[
            "exits",
            "train",
            "--data",
            s(data.path()),
            "--backbone",
            "cnn",
            "--mode",
            "frozen",
            "--val-size",
            "64",
            "--out",
            s(out.path()),
        ]),
        "cannot be frozen",
    );
}

#[test]
fn the_committed_models_classify_text_and_images() {
    let text = stdout_json(&dynexec(&[
        "classify",
        "--model",
        "minilm-l6-reviews",
        "--json",
        "A gorgeous, witty, seductive movie.",
        "An ugly, tedious mess from start to finish.",
    ]));
    let results = text["results"].as_array().unwrap();
    assert_eq!(results[0]["label"], "fresh");
    assert_eq!(results[1]["label"], "rotten");
    assert!(results.iter().all(|r| r["layers_total"] == 6));

    // Without --data, the card's task is read from where the fetch script put it.
    let bench = stdout_json(&dynexec(&[
        "bench",
        "exits",
        "--model",
        "cnn-fashion-mnist",
        "--policies",
        "fixed:1",
        "--timed-inputs",
        "4",
        "--runs",
        "1",
        "--json",
    ]));
    assert_eq!(bench["inputs"], 10000, "the Fashion-MNIST test split");
    assert_eq!(bench["rows"][1]["mean_exit_layer"], 1.0);
}

#[test]
fn bad_exit_inputs_are_clear_errors() {
    assert_clear_error(
        &dynexec(&["classify", "--model", "minilm-l6", "text"]),
        "is not an exit model",
    );
    assert_clear_error(
        &dynexec(&[
            "classify",
            "--model",
            "minilm-l6-reviews",
            "--policy",
            "confidence:x",
            "t",
        ]),
        "bad exit policy",
    );
    assert_clear_error(
        &dynexec(&[
            "classify",
            "--model",
            "minilm-l6-reviews",
            "--policy",
            "fixed:9",
            "t",
        ]),
        "only 6 exits",
    );
    assert_clear_error(
        &dynexec(&["classify", "--model", "minilm-l6-reviews"]),
        "nothing to classify",
    );
    let empty = tempfile::tempdir().unwrap();
    assert_clear_error(
        &dynexec(&[
            "exits",
            "train",
            "--data",
            s(empty.path()),
            "--out",
            s(empty.path()),
        ]),
        "dynexec data pull",
    );
    assert_clear_error(
        &dynexec(&[
            "exits",
            "calibrate",
            s(empty.path()),
            "--data",
            s(empty.path()),
        ]),
        "has no card.json",
    );
    let reviews = small_reviews(8);
    assert_clear_error(
        &dynexec(&[
            "exits",
            "train",
            "--data",
            s(reviews.path()),
            "--backbone",
            "cnn",
            "--out",
            s(empty.path()),
        ]),
        "does not fit",
    );
}

#[test]
fn generate_with_early_exit_reports_exit_layers_and_never_exits_above_one() {
    let args = |policy: Option<&str>| {
        let mut a = vec![
            "generate",
            "--prompt",
            "The capital of France is",
            "-n",
            "12",
            "--ignore-eos",
            "--json",
        ];
        if let Some(p) = policy {
            a.extend(["--early-exit", p]);
        }
        stdout_json(&dynexec(&a))
    };
    let plain = args(None);
    let never = args(Some("confidence:1.5"));
    assert_eq!(never["token_ids"], plain["token_ids"]);
    assert_eq!(never["early_exit"]["mean_exit_layer"], 30.0);
    let always = args(Some("saturation:-1"));
    let layers = always["early_exit"]["exit_layers"].as_array().unwrap();
    assert_eq!(layers.len(), 11, "every decoded token after the prefill's");
    let first = layers[0].as_u64().unwrap();
    assert!(first < 30 && layers.iter().all(|l| l.as_u64() == Some(first)));
    assert!(plain.get("early_exit").is_none());

    // The adapters also serve the layer-skip drafter, and drafting stays lossless.
    let drafted = stdout_json(&dynexec(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "-n",
        "12",
        "--ignore-eos",
        "--json",
        "--draft",
        "self-layers:10",
        "--exit-adapters",
        "smollm2-135m-instruct-exits",
    ]));
    assert_eq!(drafted["token_ids"], plain["token_ids"]);
    assert_eq!(drafted["draft"], "self-layers:10+adapter");
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--prompt",
            "Hi",
            "--draft",
            "self-layers:7",
            "--exit-adapters",
            "smollm2-135m-instruct-exits",
        ]),
        "draft with one of those depths",
    );
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--prompt",
            "Hi",
            "--exit-adapters",
            "smollm2-135m-instruct-exits",
        ]),
        "needs --early-exit or --draft",
    );
    assert_clear_error(
        &dynexec(&["generate", "--prompt", "Hi", "--early-exit", "sometimes:1"]),
        "bad --early-exit",
    );
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--prompt",
            "Hi",
            "--early-exit",
            "confidence:0.5",
            "--exit-adapters",
            "minilm-l6",
        ]),
        "holds no adapters.json",
    );
    assert_clear_error(
        &dynexec(&[
            "generate",
            "--prompt",
            "Hi",
            "--early-exit",
            "confidence:0.5",
            "--draft",
            "ngram",
        ]),
        "cannot be used with",
    );
}

#[test]
fn exit_classifiers_train_on_kept_adapters_and_decide_exits() {
    let committed =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-135m-instruct-exits");
    let out = tempfile::tempdir().unwrap();
    let trained = stdout_json(&dynexec(&[
        "exits",
        "train-adapters",
        "--keep-adapters",
        s(&committed),
        "--out",
        s(out.path()),
        "--skip",
        "0",
        "--count",
        "6",
        "--gen-tokens",
        "12",
        "--held-out",
        "0.34",
        "--classifier-steps",
        "40",
        "--json",
    ]));
    let card = &trained["card"];
    let kept: Value =
        serde_json::from_str(&std::fs::read_to_string(committed.join("adapters.json")).unwrap())
            .unwrap();
    // The adapters and their record are kept; only the classifiers are new.
    assert_eq!(card["training"], kept["training"]);
    assert_eq!(card["agreement_after"], kept["agreement_after"]);
    let classifier = &card["classifier"];
    assert_eq!(classifier["steps"], 40);
    assert!(classifier["command"]
        .as_str()
        .unwrap()
        .contains("--keep-adapters"));
    for key in ["held_out_agreement", "held_out_accuracy", "held_out_auc"] {
        let values = classifier[key].as_array().unwrap();
        assert_eq!(values.len(), 5, "{key}");
        assert!(values
            .iter()
            .all(|v| (0.0..=1.0).contains(&v.as_f64().unwrap())));
    }
    let read = |dir: &Path| {
        candle_core::safetensors::load(dir.join("adapters.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (before, after) = (read(&committed), read(out.path()));
    for (name, tensor) in before.iter().filter(|(n, _)| n.starts_with("adapters.")) {
        let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(tensor), values(&after[name]), "{name} changed");
    }
    assert_eq!(
        after
            .keys()
            .filter(|n| n.starts_with("classifiers."))
            .count(),
        10
    );

    let generate = |policy: Option<&str>, adapters: &str| {
        let mut a = vec![
            "generate",
            "--prompt",
            "The capital of France is",
            "-n",
            "10",
            "--ignore-eos",
            "--json",
        ];
        if let Some(p) = policy {
            a.extend(["--early-exit", p, "--exit-adapters", adapters]);
        }
        dynexec(&a)
    };
    let plain = stdout_json(&generate(None, ""));
    let never = stdout_json(&generate(Some("classifier:1.5"), s(out.path())));
    assert_eq!(never["token_ids"], plain["token_ids"]);
    assert_eq!(never["early_exit"]["mean_exit_layer"], 30.0);
    // Threshold 0: every probability passes, so each token leaves at the first exit.
    let always = stdout_json(&generate(Some("classifier:0"), s(out.path())));
    let layers = always["early_exit"]["exit_layers"].as_array().unwrap();
    assert_eq!(layers.len(), 9);
    assert!(layers.iter().all(|l| l.as_u64() == Some(5)), "{layers:?}");

    // Adapters without classifiers refuse `classifier:T` by name.
    let bare = tempfile::tempdir().unwrap();
    let mut bare_card = card.clone();
    bare_card.as_object_mut().unwrap().remove("classifier");
    std::fs::write(
        bare.path().join("adapters.json"),
        serde_json::to_string(&bare_card).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        out.path().join("adapters.safetensors"),
        bare.path().join("adapters.safetensors"),
    )
    .unwrap();
    assert_clear_error(
        &generate(Some("classifier:0.9"), s(bare.path())),
        "carry no exit classifiers",
    );
}
