//! int8/4-bit conversion: in place, to a GGUF file and back, and its cost in logits.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, smollm2_gguf, write_random_llama};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_models::llama::Llama;
use dynexec_quant::gguf_export::{export_gguf, ExportSource};
use dynexec_quant::{quantize_in_place, WeightFormat};

fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    let scalar = |t: candle_core::Result<Tensor>| t.unwrap().to_scalar::<f32>().unwrap();
    let norm = |t: &Tensor| scalar(t.sqr().and_then(|s| s.sum_all()?.sqrt()));
    scalar((a * b).and_then(|p| p.sum_all())) / (norm(a) * norm(b))
}

const PROMPTS: [&str; 3] = [
    "The history of the United States began with",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Photosynthesis is the process by which plants",
];

#[test]
fn gguf_round_trip_equals_in_place_quantization() {
    let src = smollm2_gguf();
    let dir = tempfile::tempdir().unwrap();
    for format in [WeightFormat::Q8_0, WeightFormat::Q4_0] {
        let (mut in_place, content) = Llama::load_gguf(&src, &Device::Cpu).unwrap();
        let tokenizer = TextTokenizer::from_gguf(&content).unwrap();
        let report = quantize_in_place(&mut in_place, format).unwrap();
        assert_eq!(
            report.layers,
            30 * 7 + 1,
            "every linear layer, the head included"
        );
        let out = dir.path().join(format!("m-{format}.gguf"));
        export_gguf(&mut in_place, format, ExportSource::Gguf(&src), &out).unwrap();

        let (reloaded, reloaded_content) = Llama::load_gguf(&out, &Device::Cpu).unwrap();
        let reloaded_tokenizer = TextTokenizer::from_gguf(&reloaded_content).unwrap();
        for prompt in PROMPTS {
            let ids = tokenizer.encode(prompt).unwrap();
            assert_eq!(
                reloaded_tokenizer.encode(prompt).unwrap(),
                ids,
                "the tokenizer travels with the file"
            );
            let a = in_place
                .forward(&ids, &mut in_place.new_cache(), None)
                .unwrap();
            let b = reloaded
                .forward(&ids, &mut reloaded.new_cache(), None)
                .unwrap();
            assert_eq!(max_abs_diff(&a, &b), 0.0, "{format}: {prompt:?}");
        }
    }
}

/// Q8_0 costs little: last-position logits stay at cosine > 0.999 of f32, both for the
/// weights alone (dequantized back to f32) and end to end with dynexec's Q8_0 kernel, which
/// keeps activations in F32. (candle's kernel, which quantizes activations too, measured down
/// to 0.992 on the third prompt.)
#[test]
fn q8_0_logits_stay_close_to_f32() {
    let src = smollm2_gguf();
    let (mut f32_model, content) = Llama::load_gguf(&src, &Device::Cpu).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&content).unwrap();
    quantize_in_place(&mut f32_model, WeightFormat::F32).unwrap();
    let mut q8 = f32_model.clone();
    quantize_in_place(&mut q8, WeightFormat::Q8_0).unwrap();
    assert!(q8.weight_bytes() * 3 < f32_model.weight_bytes() * 2);
    // The Q8_0 weights, dequantized back: what quantization did to the weights alone.
    let mut q8_weights_in_f32 = q8.clone();
    quantize_in_place(&mut q8_weights_in_f32, WeightFormat::F32).unwrap();
    for prompt in PROMPTS {
        let ids = tokenizer.encode(prompt).unwrap();
        let reference = f32_model
            .forward_last(&ids, &mut f32_model.new_cache(), None)
            .unwrap();
        let weights_only = q8_weights_in_f32
            .forward_last(&ids, &mut q8_weights_in_f32.new_cache(), None)
            .unwrap();
        let end_to_end = q8.forward_last(&ids, &mut q8.new_cache(), None).unwrap();
        let (w, e) = (
            cosine(&reference, &weights_only),
            cosine(&reference, &end_to_end),
        );
        eprintln!("{prompt:?}: weights-only cosine {w:.5}, end-to-end {e:.5}");
        assert!(w > 0.999, "{prompt:?}: Q8_0 weights cosine {w}");
        assert!(e > 0.999, "{prompt:?}: Q8_0 end-to-end cosine {e}");
    }
}

#[test]
fn dense_checkpoint_exports_to_a_llama_gguf() {
    // A random transformers-layout llama with SmolLM2's vocabulary, so its tokenizer can be
    // embedded; q/k rows must be permuted for llama.cpp's RoPE layout.
    let dir = tempfile::tempdir().unwrap();
    let (_, content) = Llama::load_gguf(&smollm2_gguf(), &Device::Cpu).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&content).unwrap();
    write_random_llama(dir.path(), false, false, tokenizer.vocab_size());
    tokenizer
        .inner()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    let dense_tokenizer = TextTokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let weights = vec![dir.path().join("model.safetensors")];
    let dense = Llama::load_safetensors(
        &dir.path().join("config.json"),
        &weights,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for format in [WeightFormat::F32, WeightFormat::Q8_0] {
        let mut converted = dense.clone();
        quantize_in_place(&mut converted, format).unwrap();
        let out = dir.path().join(format!("dense-{format}.gguf"));
        export_gguf(
            &mut converted,
            format,
            ExportSource::Dense(&dense_tokenizer),
            &out,
        )
        .unwrap();
        let (reloaded, reloaded_content) = Llama::load_gguf(&out, &Device::Cpu).unwrap();
        let reloaded_tokenizer = TextTokenizer::from_gguf(&reloaded_content).unwrap();
        let ids = dense_tokenizer.encode("Hello world, 123 apples!").unwrap();
        assert_eq!(
            reloaded_tokenizer
                .encode("Hello world, 123 apples!")
                .unwrap(),
            ids
        );
        let a = converted
            .forward(&ids, &mut converted.new_cache(), None)
            .unwrap();
        let b = reloaded
            .forward(&ids, &mut reloaded.new_cache(), None)
            .unwrap();
        // The permuted layout sums RoPE'd features in another order: float rounding only,
        // which the quantized activations of q8_0 can magnify a little.
        let tolerance = if format == WeightFormat::F32 {
            1e-4
        } else {
            5e-2
        };
        let diff = max_abs_diff(&a, &b);
        assert!(
            diff < tolerance,
            "{format}: exported logits differ by {diff}"
        );
    }
    // The unconverted model still works (conversion never touched it).
    dense
        .forward(&[1, 2, 3], &mut dense.new_cache(), None)
        .unwrap();
}

/// The K-quant kernels on real weights: SmolLM2's MLP down projections (1536 inputs, whole
/// 256-value super-blocks) as Q4_K and Q6_K give what candle's dequantized F32 matmul gives,
/// within a small fraction of the outputs' size, for one and several rows.
#[test]
fn k_quant_kernels_match_dequantized_matmul_on_real_weights() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use dynexec_models::linear::{HasLinears, Linear};
    let (mut model, _) = Llama::load_gguf(&smollm2_gguf(), &Device::Cpu).unwrap();
    let downs: Vec<Tensor> = model
        .linears_mut()
        .into_iter()
        .filter(|(name, _)| name.ends_with("ffn_down"))
        .step_by(10)
        .map(|(_, l)| l.float_weight().unwrap())
        .collect();
    assert_eq!(downs.len(), 3);
    for weight in &downs {
        let x = Tensor::randn(0f32, 1.0, (5, 1536), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(weight, dtype).unwrap();
            let reference = x
                .matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap())
                .unwrap();
            let layer = Linear::from_qtensor(q, None).unwrap();
            let ours = layer.forward(&x).unwrap();
            let scale = reference
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_abs_diff(&ours, &reference);
            assert!(diff < 1e-4 * scale.max(1.0), "{dtype:?}: {diff} of {scale}");
            let one = layer.forward(&x.narrow(0, 2, 1).unwrap()).unwrap();
            assert_eq!(
                one.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                ours.get(2).unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
}

/// dynexec's Q4_1 kernel (16-bit activations) against the same weights dequantized to F32:
/// over 256 greedy tokens, the tokens agree (teacher-forced: both score the F32 model's own
/// continuation) and the free-running outputs share a long prefix.
#[test]
fn q4_1_kernels_agree_with_the_f32_dequantized_model_over_256_tokens() {
    use dynexec_models::generation::{generate, GenerateOptions};
    let (quantized, content) = Llama::load_gguf(&smollm2_gguf(), &Device::Cpu).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&content).unwrap();
    let mut dense = quantized.clone();
    quantize_in_place(&mut dense, WeightFormat::F32).unwrap();
    let prompt = tokenizer
        .encode("The history of the printing press begins")
        .unwrap();
    let options = GenerateOptions {
        stop_at_eos: false,
        ..GenerateOptions::greedy(256)
    };
    let reference = generate(&dense, &tokenizer, &prompt, &options, None, |_| Ok(())).unwrap();
    let ours = generate(&quantized, &tokenizer, &prompt, &options, None, |_| Ok(())).unwrap();
    let prefix = reference
        .token_ids
        .iter()
        .zip(&ours.token_ids)
        .take_while(|(a, b)| a == b)
        .count();
    // Teacher-forced: both models score every position of the reference sequence.
    let mut all = prompt.clone();
    all.extend_from_slice(&reference.token_ids);
    let score = |model: &Llama| {
        let logits = model.forward(&all, &mut model.new_cache(), None).unwrap();
        let start = prompt.len() - 1;
        Llama::argmax_rows(&logits.narrow(0, start, 256).unwrap()).unwrap()
    };
    let (a, b) = (score(&dense), score(&quantized));
    let agreement = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / 256.0;
    eprintln!("Q4_1 kernels vs f32 dequantized: {:.1}% teacher-forced agreement, identical for the first {prefix} of 256 free-running tokens", agreement * 100.0);
    assert!(agreement >= 0.97, "agreement {agreement}");
    assert!(
        prefix >= 32,
        "free-running outputs diverge after {prefix} tokens"
    );
}
