//! Our decoder against candle-transformers on the same weights: SmolLM2's GGUF against
//! `quantized_llama`, and a random dense llama (safetensors) against `llama`.

mod common;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use common::{max_abs_diff, smollm2_gguf};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_models::linear::{CpuKernels, HasLinears};
use dynexec_models::llama::Llama;

/// With candle's kernels selected, both implementations run the same quantized kernels on
/// products of the same shapes, so their logits agree to float rounding (measured:
/// bit-identical). The bound is tight on purpose: Q4_1 layers quantize activations to Q8_1,
/// which turns any reordering of float sums into ~1 logit of difference.
const GGUF_LOGIT_TOLERANCE: f32 = 1e-4;

/// The default Q8_0 kernel against an F32 head with the same (dequantized) weights: the
/// activations' 16-bit (15-bit on AVX2) rounding and the order of float sums differ, a few
/// thousandths of a logit; candle's 8-bit activations land ~0.4 away.
const DEFAULT_KERNEL_LOGIT_TOLERANCE: f32 = 5e-3;

fn peer(path: &std::path::Path) -> ModelWeights {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap()
}

#[test]
fn smollm2_greedy_tokens_and_logits_match_quantized_llama() {
    let path = smollm2_gguf();
    let (mut ours, content) = Llama::load_gguf(&path, &Device::Cpu).unwrap();
    ours.set_cpu_kernels(CpuKernels::Candle);
    let tokenizer = TextTokenizer::from_gguf(&content).unwrap();
    let mut theirs = peer(&path);
    let prompts = [
        tokenizer
            .chat_prompt(None, "What is the capital of France?")
            .unwrap(),
        "The three primary colors are".to_string(),
        tokenizer
            .chat_prompt(None, "Write a short poem about the sea.")
            .unwrap(),
    ];
    let steps = 64;
    for prompt in &prompts {
        let ids = tokenizer.encode(prompt).unwrap();
        theirs.clear_kv_cache();
        let (our_tokens, their_tokens, worst) =
            common::greedy_side_by_side(&ours, &mut |x, p| theirs.forward(x, p), &ids, steps);
        assert_eq!(
            our_tokens, their_tokens,
            "greedy tokens differ for {prompt:?}"
        );
        assert!(
            worst < GGUF_LOGIT_TOLERANCE,
            "logits differ by {worst} for {prompt:?}"
        );
        eprintln!("{prompt:?}: {steps} tokens identical, max |Δlogit| = {worst:.2e}");
    }
}

/// dynexec's default Q8_0 kernel (SmolLM2's LM head is Q8_0) computes the same product as
/// an F32 head holding the dequantized Q8_0 weights, up to float rounding; candle's kernel
/// quantizes the activations as well and lands ~0.4 logit away.
#[test]
fn default_cpu_kernels_equals_the_dequantized_head() {
    let path = smollm2_gguf();
    let (model, content) = Llama::load_gguf(&path, &Device::Cpu).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&content).unwrap();
    let mut exact_head = model.clone();
    for (name, linear) in exact_head.linears_mut() {
        if name == "output" {
            *linear = linear
                .convert(dynexec_models::linear::WeightFormat::F32)
                .unwrap();
        }
    }
    let mut candle_head = model.clone();
    candle_head.set_cpu_kernels(CpuKernels::Candle);
    for prompt in [
        "The three primary colors are",
        "Once upon a time, in a small village,",
    ] {
        let ids = tokenizer.encode(prompt).unwrap();
        let reference = exact_head
            .forward_last(&ids, &mut exact_head.new_cache(), None)
            .unwrap();
        let ours = model
            .forward_last(&ids, &mut model.new_cache(), None)
            .unwrap();
        let candle = candle_head
            .forward_last(&ids, &mut candle_head.new_cache(), None)
            .unwrap();
        let (ours_err, candle_err) = (
            max_abs_diff(&ours, &reference),
            max_abs_diff(&candle, &reference),
        );
        eprintln!("{prompt:?}: default kernel {ours_err:.2e}, candle kernel {candle_err:.2e}");
        assert!(
            ours_err < DEFAULT_KERNEL_LOGIT_TOLERANCE,
            "{prompt:?}: {ours_err}"
        );
        assert!(
            ours_err < candle_err,
            "{prompt:?}: default {ours_err} vs candle {candle_err}"
        );
    }
}

mod dense {
    use super::*;
    use candle_nn::VarBuilder;
    use candle_transformers::models::llama as peer_llama;

    #[test]
    fn random_dense_llama_matches_candle_transformers_llama() {
        for tie in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            common::write_random_llama(dir.path(), tie, false, 50);
            let weights = vec![dir.path().join("model.safetensors")];
            let ours = Llama::load_safetensors(
                &dir.path().join("config.json"),
                &weights,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();

            let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
            let cfg: peer_llama::LlamaConfig = serde_json::from_str(&text).unwrap();
            let cfg = cfg.into_config(false);
            let vb = unsafe {
                VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &Device::Cpu).unwrap()
            };
            let theirs = peer_llama::Llama::load(vb, &cfg).unwrap();
            let mut their_cache =
                peer_llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();

            let ids: Vec<u32> = vec![3, 17, 42, 8, 8, 1, 49, 20];
            let mut cache = ours.new_cache();
            let our_last = ours.forward_last(&ids, &mut cache, None).unwrap();
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let their_last = theirs
                .forward(&input, 0, &mut their_cache)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let diff = max_abs_diff(&our_last, &their_last);
            assert!(diff < 1e-4, "tie={tie}: prefill logits differ by {diff}");

            // A multi-token forward (prefill, speculative verification) gives each position
            // the logits that feeding the tokens one at a time gives. (On quantized weights
            // the two differ by up to ~1 logit: activations are quantized per row, which
            // amplifies the different summation order of batched products.)
            let mut one_by_one = ours.new_cache();
            let all = ours.forward(&ids, &mut ours.new_cache(), None).unwrap();
            for (i, id) in ids.iter().enumerate() {
                let one = ours
                    .forward(&[*id], &mut one_by_one, None)
                    .unwrap()
                    .squeeze(0)
                    .unwrap();
                let diff = max_abs_diff(&one, &all.get(i).unwrap());
                assert!(diff < 1e-4, "tie={tie}: position {i} differs by {diff}");
            }

            // Continue token by token with both caches.
            let mut pos = ids.len();
            for next in [5u32, 9, 33] {
                let ours_step = ours.forward_last(&[next], &mut cache, None).unwrap();
                let input = Tensor::new(&[next], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let theirs_step = theirs
                    .forward(&input, pos, &mut their_cache)
                    .unwrap()
                    .squeeze(0)
                    .unwrap();
                let diff = max_abs_diff(&ours_step, &theirs_step);
                assert!(diff < 1e-4, "tie={tie}: decode logits differ by {diff}");
                pos += 1;
            }
        }
    }
}

#[test]
fn random_qwen2_with_qkv_bias_matches_candle_transformers_qwen2() {
    use candle_nn::VarBuilder;
    use candle_transformers::models::qwen2;
    let dir = tempfile::tempdir().unwrap();
    common::write_random_llama(dir.path(), true, true, 50);
    let weights = vec![dir.path().join("model.safetensors")];
    let ours = Llama::load_safetensors(
        &dir.path().join("config.json"),
        &weights,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(ours.config().qkv_bias);
    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let cfg: qwen2::Config = serde_json::from_str(&text).unwrap();
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &Device::Cpu).unwrap() };
    let mut theirs = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();

    let ids: Vec<u32> = vec![4, 8, 15, 16, 23, 42];
    let mut cache = ours.new_cache();
    let our_last = ours.forward_last(&ids, &mut cache, None).unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let their_last = theirs.forward(&input, 0).unwrap().flatten_all().unwrap();
    let diff = max_abs_diff(&our_last, &their_last);
    assert!(diff < 1e-4, "qwen2 prefill logits differ by {diff}");
    let our_next = ours.forward_last(&[7], &mut cache, None).unwrap();
    let input = Tensor::new(&[7u32], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let their_next = theirs
        .forward(&input, ids.len())
        .unwrap()
        .flatten_all()
        .unwrap();
    let diff = max_abs_diff(&our_next, &their_next);
    assert!(diff < 1e-4, "qwen2 decode logits differ by {diff}");
}
