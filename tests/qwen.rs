//! Qwen2.5-Coder 1.5B (Q4_K_M) and 0.5B (mostly Q5_0) against peers on the same files:
//! candle-transformers' `quantized_qwen2` with candle's kernels selected, and the
//! f32-dequantized model with dynexec's kernels.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use candle_transformers::models::quantized_qwen2::ModelWeights;
use common::{manifest_gguf, max_abs_diff};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_models::generation::{generate, GenerateOptions};
use dynexec_models::linear::{CpuKernels, HasLinears};
use dynexec_models::llama::Llama;
use dynexec_quant::{quantize_in_place, WeightFormat};

const MODELS: [&str; 2] = ["qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"];

/// With candle's kernels, both implementations run candle's quantized products on the same
/// shapes, so logits agree to float rounding (measured: bit-identical). Tight on purpose:
/// candle's kernels quantize activations to 8 bits, which turns any reordering of float
/// sums into a visible difference.
const PEER_LOGIT_TOLERANCE: f32 = 1e-4;

/// dynexec's kernels (15-bit activations) against the f32-dequantized weights: the
/// activations' rounding and the order of float sums, over 28 layers and a 151,936-token head
/// (measured: 1.2e-3 to 2.4e-3 on the prompts below).
const DEQUANTIZED_LOGIT_TOLERANCE: f32 = 1e-2;

fn prompts(tokenizer: &TextTokenizer) -> Vec<Vec<u32>> {
    [
        tokenizer
            .chat_prompt(
                None,
                "Write a Python function that checks whether a string is a palindrome.",
            )
            .unwrap(),
        "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n".to_string(),
        tokenizer
            .chat_prompt(
                Some("Answer briefly."),
                "What does the Rust borrow checker do?",
            )
            .unwrap(),
    ]
    .iter()
    .map(|p| tokenizer.encode(p).unwrap())
    .collect()
}

fn load(name: &str) -> (Llama, TextTokenizer) {
    let (model, content) = Llama::load_gguf(&manifest_gguf(name), &Device::Cpu).unwrap();
    (model, TextTokenizer::from_gguf(&content).unwrap())
}

#[test]
fn greedy_tokens_match_candle_transformers_quantized_qwen2() {
    let name = MODELS[0];
    let path = manifest_gguf(name);
    let (mut ours, tokenizer) = load(name);
    ours.set_cpu_kernels(CpuKernels::Candle);
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut theirs = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let steps = 64;
    for ids in prompts(&tokenizer) {
        theirs.clear_kv_cache();
        let (our_tokens, their_tokens, worst) =
            common::greedy_side_by_side(&ours, &mut |x, p| theirs.forward(x, p), &ids, steps);
        let text = tokenizer.decode(&our_tokens).unwrap();
        assert_eq!(our_tokens, their_tokens, "greedy tokens differ: {text:?}");
        assert!(
            worst < PEER_LOGIT_TOLERANCE,
            "logits differ by {worst}: {text:?}"
        );
        eprintln!(
            "{name}: {steps} tokens identical to quantized_qwen2, max |Δlogit| = {worst:.2e}"
        );
    }
}

/// 64 greedy tokens on dynexec's kernels are the f32-dequantized model's own greedy tokens:
/// scoring the whole continuation in one pass, the f32 model picks every one of them. The
/// last prompt position's logits agree within [`DEQUANTIZED_LOGIT_TOLERANCE`].
#[test]
fn greedy_tokens_match_the_f32_dequantized_model_on_both_models() {
    let steps = 64;
    for name in MODELS {
        let (quantized, tokenizer) = load(name);
        let mut dense = quantized.clone();
        quantize_in_place(&mut dense, WeightFormat::F32).unwrap();
        let options = GenerateOptions {
            stop_at_eos: false,
            ..GenerateOptions::greedy(steps)
        };
        for ids in prompts(&tokenizer) {
            let ours = generate(&quantized, &tokenizer, &ids, &options, None, |_| Ok(())).unwrap();
            let mut all = ids.clone();
            all.extend_from_slice(&ours.token_ids);
            let reference = dense.forward(&all, &mut dense.new_cache(), None).unwrap();
            let start = ids.len() - 1;
            let picks = Llama::argmax_rows(&reference.narrow(0, start, steps).unwrap()).unwrap();
            let text = tokenizer.decode(&ours.token_ids).unwrap();
            assert_eq!(picks, ours.token_ids, "{name}: {text:?}");
            let last = quantized
                .forward_last(&ids, &mut quantized.new_cache(), None)
                .unwrap();
            let diff = max_abs_diff(&last, &reference.get(start).unwrap());
            assert!(
                diff < DEQUANTIZED_LOGIT_TOLERANCE,
                "{name}: last-position logits differ by {diff}"
            );
            eprintln!("{name}: {steps} greedy tokens identical to f32-dequantized, last-position max |Δlogit| = {diff:.2e}");
        }
    }
}
