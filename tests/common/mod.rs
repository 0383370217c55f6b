//! Helpers shared by the cross-crate tests.
#![allow(dead_code)]

use dynexec_core::files::ModelFiles;
use dynexec_hub::Hub;
use std::path::PathBuf;

/// The default decoder's files, pulled (and cached) on first use, like the CLI does.
pub fn smollm2_files() -> ModelFiles {
    let mut hub = Hub::from_env().expect("manifest");
    hub.progress = false;
    hub.resolve("smollm2-135m-instruct").expect(
        "smollm2-135m-instruct must be available: run `dynexec models pull smollm2-135m-instruct`",
    )
}

/// The GGUF of a manifest model, pulled (and cached) on first use.
pub fn manifest_gguf(name: &str) -> PathBuf {
    let mut hub = Hub::from_env().expect("manifest");
    hub.progress = false;
    hub.resolve(name)
        .unwrap_or_else(|e| {
            panic!("{name} must be available: run `dynexec models pull {name}` ({e})")
        })
        .find(".gguf")
        .expect("gguf file")
        .to_path_buf()
}

pub fn smollm2_gguf() -> PathBuf {
    smollm2_files()
        .find(".gguf")
        .expect("gguf file")
        .to_path_buf()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A small random llama with GQA, saved as a transformers checkpoint; `qwen2` adds the
/// q/k/v biases and the config keys of a Qwen2 model.
pub fn write_random_llama(dir: &std::path::Path, tie: bool, qwen2: bool, vocab: usize) {
    let config = serde_json::json!({
        "model_type": if qwen2 { "qwen2" } else { "llama" },
        "sliding_window": 128,
        "max_window_layers": 3,
        "use_sliding_window": false,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let dev = candle_core::Device::Cpu;
    let mut tensors: std::collections::HashMap<String, candle_core::Tensor> =
        std::collections::HashMap::new();
    let mut add = |name: &str, shape: &[usize], scale: f64| {
        let t = (candle_core::Tensor::randn(0f32, 1f32, shape, &dev).unwrap() * scale).unwrap();
        tensors.insert(name.to_string(), t);
    };
    add("model.embed_tokens.weight", &[vocab, 64], 1.0);
    for i in 0..3 {
        let p = format!("model.layers.{i}");
        add(&format!("{p}.self_attn.q_proj.weight"), &[64, 64], 0.1);
        add(&format!("{p}.self_attn.k_proj.weight"), &[32, 64], 0.1);
        add(&format!("{p}.self_attn.v_proj.weight"), &[32, 64], 0.1);
        add(&format!("{p}.self_attn.o_proj.weight"), &[64, 64], 0.1);
        if qwen2 {
            add(&format!("{p}.self_attn.q_proj.bias"), &[64], 0.5);
            add(&format!("{p}.self_attn.k_proj.bias"), &[32], 0.5);
            add(&format!("{p}.self_attn.v_proj.bias"), &[32], 0.5);
        }
        add(&format!("{p}.mlp.gate_proj.weight"), &[96, 64], 0.1);
        add(&format!("{p}.mlp.up_proj.weight"), &[96, 64], 0.1);
        add(&format!("{p}.mlp.down_proj.weight"), &[64, 96], 0.1);
        add(&format!("{p}.input_layernorm.weight"), &[64], 1.0);
        add(&format!("{p}.post_attention_layernorm.weight"), &[64], 1.0);
    }
    add("model.norm.weight", &[64], 1.0);
    if !tie {
        add("lm_head.weight", &[vocab, 64], 0.1);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

/// Greedy decoding of `steps` tokens after `ids` by our decoder and a candle-transformers peer
/// side by side, each fed its own tokens. `peer_forward(input, position)` is the peer's
/// `forward` (input `(1, seq)`, last-position logits `(1, vocab)`; its cache reset by the
/// caller). Returns our tokens, the peer's, and the largest logit difference seen.
pub fn greedy_side_by_side(
    ours: &dynexec_models::llama::Llama,
    peer_forward: &mut dyn FnMut(
        &candle_core::Tensor,
        usize,
    ) -> candle_core::Result<candle_core::Tensor>,
    ids: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<u32>, f32) {
    let mut peer = |tokens: &[u32], position: usize| {
        let input = candle_core::Tensor::new(tokens, &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        peer_forward(&input, position).unwrap().squeeze(0).unwrap()
    };
    let mut cache = ours.new_cache();
    let mut our_logits = ours.forward_last(ids, &mut cache, None).unwrap();
    let mut their_logits = peer(ids, 0);
    let (mut our_tokens, mut their_tokens) = (Vec::new(), Vec::new());
    let mut worst = 0f32;
    for step in 0..steps {
        worst = worst.max(max_abs_diff(&our_logits, &their_logits));
        let a = our_logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        let b = their_logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        our_tokens.push(a);
        their_tokens.push(b);
        our_logits = ours.forward_last(&[a], &mut cache, None).unwrap();
        their_logits = peer(&[b], ids.len() + step);
    }
    (our_tokens, their_tokens, worst)
}

/// A data set's folder, pulled into the cache on first use (parallel tests wait on one pull).
pub fn data_dir(name: &str) -> PathBuf {
    let mut hub = Hub::from_env().expect("hub");
    hub.progress = false;
    hub.data_set(name)
        .unwrap_or_else(|e| panic!("pulling data set `{name}` failed: {e}"))
        .dir
}
