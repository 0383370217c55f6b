//! Our BERT encoder against candle-transformers' BertModel on all-MiniLM-L6-v2, and the
//! sentence-transformers reference similarities.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use common::max_abs_diff;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_hub::Hub;
use dynexec_models::bert::{pad_batch, Bert};

fn minilm() -> (Bert, TextTokenizer, dynexec_core::files::ModelFiles) {
    let mut hub = Hub::from_env().unwrap();
    hub.progress = false;
    let files = hub
        .resolve("minilm-l6")
        .expect("run `dynexec models pull minilm-l6`");
    let weights = vec![files.find("model.safetensors").unwrap().to_path_buf()];
    let bert = Bert::load(
        files.find("config.json").unwrap(),
        &weights,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let tokenizer = TextTokenizer::from_file(files.find("tokenizer.json").unwrap()).unwrap();
    (bert, tokenizer, files)
}

#[test]
fn hidden_states_match_candle_transformers_bert_with_padding() {
    let (ours, tokenizer, files) = minilm();
    let config: Config =
        serde_json::from_str(&std::fs::read_to_string(files.find("config.json").unwrap()).unwrap())
            .unwrap();
    let weights = vec![files.find("model.safetensors").unwrap().to_path_buf()];
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &Device::Cpu).unwrap() };
    let theirs = BertModel::load(vb, &config).unwrap();

    let sentences = [
        "A man is eating food.",
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Hi",
    ];
    let encoded: Vec<Vec<u32>> = sentences
        .iter()
        .map(|s| tokenizer.encode(s).unwrap())
        .collect();
    let (ids, mask) = pad_batch(&encoded, &Device::Cpu).unwrap();
    let ours_hidden = ours.forward(&ids, &mask).unwrap();
    let theirs_hidden = theirs
        .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
        .unwrap();
    // Compare real tokens only: padded positions are never used.
    for (row, e) in encoded.iter().enumerate() {
        let a = ours_hidden.get(row).unwrap().narrow(0, 0, e.len()).unwrap();
        let b = theirs_hidden
            .get(row)
            .unwrap()
            .narrow(0, 0, e.len())
            .unwrap();
        let diff = max_abs_diff(&a, &b);
        assert!(
            diff < 1e-4,
            "sentence {row}: hidden states differ by {diff}"
        );
    }
}

#[test]
fn layers_run_in_pieces_equal_the_whole() {
    let (bert, tokenizer, _) = minilm();
    let ids = tokenizer.encode("Layer by layer.").unwrap();
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
    let bias = bert.attention_bias(&mask).unwrap();
    let whole = bert.forward(&ids, &mask).unwrap();
    let first = bert
        .forward_layers(&bert.embed(&ids).unwrap(), &bias, 0..3)
        .unwrap();
    let rest = bert.forward_layers(&first, &bias, 3..6).unwrap();
    assert_eq!(max_abs_diff(&whole, &rest), 0.0);
    assert!(bert.forward_layers(&first, &bias, 3..7).is_err());
}

#[test]
fn sentence_similarities_match_the_sentence_transformers_reference() {
    let (bert, tokenizer, _) = minilm();
    // Cosines from sentence-transformers (mean pooling + L2 norm) on the same model.
    let pairs = [
        (
            "The cat sits outside",
            "The cat plays in the garden",
            0.6788,
        ),
        (
            "The new movie is awesome",
            "The new movie is so great",
            0.8939,
        ),
        ("I love pasta", "Do you like pizza?", 0.5096),
    ];
    for (a, b, expected) in pairs {
        let e = bert.sentence_embeddings(&tokenizer, &[a, b], 8).unwrap();
        let cos = (e.get(0).unwrap() * e.get(1).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (cos - expected).abs() < 1e-3,
            "{a:?} vs {b:?}: {cos} (expected {expected})"
        );
    }
    // Batching with padding does not change an embedding.
    let alone = bert
        .sentence_embeddings(&tokenizer, &["I love pasta"], 1)
        .unwrap();
    let batched = bert
        .sentence_embeddings(
            &tokenizer,
            &[
                "I love pasta",
                "A much longer sentence that forces padding of the first one.",
            ],
            2,
        )
        .unwrap();
    assert!(max_abs_diff(&alone.get(0).unwrap(), &batched.get(0).unwrap()) < 1e-5);
}

#[test]
fn trainable_encoder_matches_the_inference_one_and_has_gradients() {
    let (ours, tokenizer, files) = minilm();
    let weights = vec![files.find("model.safetensors").unwrap().to_path_buf()];
    let (trainable, vars) =
        Bert::load_trainable(files.find("config.json").unwrap(), &weights, &Device::Cpu).unwrap();
    let encoded: Vec<Vec<u32>> = ["A short one.", "A somewhat longer sentence about films."]
        .iter()
        .map(|s| tokenizer.encode(s).unwrap())
        .collect();
    let (ids, mask) = pad_batch(&encoded, &Device::Cpu).unwrap();
    let fused = ours.forward(&ids, &mask).unwrap();
    let composed = trainable.forward(&ids, &mask).unwrap();
    let diff = max_abs_diff(&fused, &composed);
    assert!(diff < 1e-4, "fused vs differentiable ops: {diff}");
    // Every layer's weights receive a gradient (the fused kernels would drop them).
    let loss = composed.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let data = vars.data().lock().unwrap();
    let with_grad = data
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
        .count();
    let query = data
        .keys()
        .find(|k| k.contains("layer.0.attention.self.query.weight"))
        .unwrap();
    assert!(
        grads.get(data[query].as_tensor()).is_some(),
        "no gradient for {query}"
    );
    assert!(
        with_grad + 4 >= data.len(),
        "{with_grad} of {} weights have gradients",
        data.len()
    );
}
