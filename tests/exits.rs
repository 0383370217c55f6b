//! The committed early-exit models (minilm-l6-reviews, cnn-fashion-mnist) on their real data:
//! they reproduce their cards' accuracy, thresholds 0 and >1 mean first exit and full depth,
//! full depth equals the plain model, and batches that shrink as inputs exit agree with
//! batch 1.

mod common;

use candle_core::Device;
use dynexec_exit::data::{read_splits, Dataset, Examples};
use dynexec_exit::model::{image_features, Backbone, ExitClassifier};
use dynexec_exit::policy::{softmax, ExitPolicy};
use dynexec_hub::Hub;
use dynexec_models::bert::{mean_pool, pad_batch};

/// The two committed models with the data folder each was trained on.
const MODELS: [(&str, &str); 2] = [
    ("minilm-l6-reviews", "reviews"),
    ("cnn-fashion-mnist", "fashion-mnist"),
];

fn load(name: &str) -> ExitClassifier {
    let mut hub = Hub::from_env().unwrap();
    hub.progress = false;
    ExitClassifier::load(&hub, name, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e} (run `dynexec models pull {name}`)"))
}

fn test_split(classifier: &ExitClassifier, data: &str) -> Dataset {
    let dir = common::data_dir(data);
    let splits = read_splits(&dir, 5000, &Device::Cpu).unwrap_or_else(|e| panic!("{data}: {e}"));
    splits.test.name_classes(&classifier.card.labels)
}

#[test]
fn committed_models_reproduce_their_cards_test_accuracy() {
    for (name, data) in MODELS {
        let classifier = load(name);
        let test = test_split(&classifier, data);
        let predictions = classifier.predict(&test, 64, |_| {}).unwrap();
        let measured = predictions.accuracy_per_exit();
        let card = &classifier.card.accuracy.test_per_exit;
        assert_eq!(measured.len(), card.len(), "{name}");
        for (exit, (m, c)) in measured.iter().zip(card).enumerate() {
            assert!(
                (m - c).abs() <= 0.005,
                "{name} exit {}: measured {m:.4}, card {c:.4}",
                exit + 1
            );
        }
        let calibration = classifier
            .card
            .calibration
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: the committed card is calibrated"));
        let e = predictions.evaluate(&calibration.policy);
        assert!(
            (e.accuracy - calibration.test_accuracy).abs() <= 0.005,
            "{name}: calibrated policy {} measures {:.4}, card {:.4}",
            calibration.policy,
            e.accuracy,
            calibration.test_accuracy
        );
    }
}

#[test]
fn threshold_zero_exits_first_and_above_one_runs_the_plain_model() {
    for (name, data) in MODELS {
        let classifier = load(name);
        let sample = test_split(&classifier, data).take(24).unwrap();
        let layers = classifier.num_exits();
        let first = classifier
            .classify(&sample.inputs, &ExitPolicy::parse("confidence:0").unwrap())
            .unwrap();
        assert!(first.iter().all(|c| c.exit_layer == 1), "{name}");
        let full = classifier
            .classify(
                &sample.inputs,
                &ExitPolicy::parse("confidence:1.01").unwrap(),
            )
            .unwrap();
        assert!(full.iter().all(|c| c.exit_layer == layers), "{name}");

        // The plain model: the whole backbone in one call, then the last exit's head.
        let features = match (&classifier.backbone, &sample.inputs) {
            (Backbone::Text { bert, tokenizer }, Examples::Text(texts)) => {
                let encoded: Vec<_> = texts.iter().map(|t| tokenizer.encode(t).unwrap()).collect();
                let (ids, mask) = pad_batch(&encoded, &Device::Cpu).unwrap();
                mean_pool(&bert.forward(&ids, &mask).unwrap(), &mask).unwrap()
            }
            (Backbone::Image { cnn }, Examples::Images(pixels)) => {
                let x = cnn.prepare(pixels).unwrap();
                image_features(&cnn.forward_blocks(&x, 0..cnn.num_blocks()).unwrap()).unwrap()
            }
            _ => unreachable!(),
        };
        let logits = classifier
            .heads
            .logits(layers - 1, &features)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (c, l) in full.iter().zip(&logits) {
            let probs = softmax(l);
            let (class, confidence) = dynexec_exit::policy::argmax(&probs);
            assert_eq!(c.class, class, "{name}");
            assert!((c.confidence - confidence).abs() < 1e-4, "{name}");
        }
    }
}

#[test]
fn shrinking_batches_agree_with_batch_one() {
    for (name, data) in MODELS {
        let classifier = load(name);
        let sample = test_split(&classifier, data).take(16).unwrap();
        for policy in ["confidence:0.9", "entropy:0.5", "patience:1"] {
            let policy = ExitPolicy::parse(policy).unwrap();
            let batched = classifier.classify(&sample.inputs, &policy).unwrap();
            for (i, b) in batched.iter().enumerate() {
                let one = classifier
                    .classify(&sample.select(&[i]).unwrap(), &policy)
                    .unwrap();
                assert_eq!(
                    (one[0].class, one[0].exit_layer),
                    (b.class, b.exit_layer),
                    "{name} {policy} input {i}"
                );
                assert!((one[0].confidence - b.confidence).abs() < 1e-3);
            }
        }
    }
}
