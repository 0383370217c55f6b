//! Speculative sampling with a real draft model of another shape draws from the target's
//! distribution: the marginals of the tokens a speculative step produces match the target's
//! exact marginals (computed by enumerating every continuation), and differ from the
//! draft's, so accepting drafts unverified would fail.

use candle_core::{Device, Tensor};
use dynexec_core::sampling::SamplingParams;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_models::generation::GenerateOptions;
use dynexec_models::llama::{Llama, LlamaConfig, RopeStyle};
use dynexec_spec::drafter::ModelDrafter;
use dynexec_spec::engine::generate_speculative;
use dynexec_spec::lookahead::Fixed;

const VOCAB: usize = 12;

fn config(layers: usize, hidden: usize) -> LlamaConfig {
    LlamaConfig {
        hidden_size: hidden,
        intermediate_size: 2 * hidden,
        num_layers: layers,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: hidden / 2,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_style: RopeStyle::HalfSplit,
        context_length: 64,
        vocab_size: VOCAB,
        tie_word_embeddings: false,
        qkv_bias: false,
    }
}

/// A word-level tokenizer over the 12 ids (generation streams text; the text is unused).
fn tokenizer() -> TextTokenizer {
    let vocab: String = (0..VOCAB)
        .map(|i| format!("\"t{i}\": {i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let json = format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null, "model": {{"type": "WordLevel", "vocab": {{{vocab}}}, "unk_token": "t0"}}}}"#
    );
    let dir = std::env::temp_dir().join(format!("dynexec-sampled-pair-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    TextTokenizer::from_file(&path).unwrap()
}

fn softmax(logits: &Tensor) -> Vec<f64> {
    let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    let max = v.iter().copied().fold(f32::MIN, f32::max);
    let e: Vec<f64> = v.iter().map(|x| f64::from(x - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// The model's next-token distribution after `ids`.
fn next(model: &Llama, ids: &[u32]) -> Vec<f64> {
    let mut cache = model.new_cache();
    softmax(&model.forward_last(ids, &mut cache, None).unwrap())
}

/// Exact marginals of generated tokens 2 and 3 after `prompt`, by enumeration.
fn exact_marginals(model: &Llama, prompt: &[u32]) -> (Vec<f64>, Vec<f64>) {
    let (mut second, mut third) = (vec![0.0; VOCAB], vec![0.0; VOCAB]);
    let p1 = next(model, prompt);
    for (t1, &q1) in p1.iter().enumerate() {
        let mut ids = prompt.to_vec();
        ids.push(t1 as u32);
        let p2 = next(model, &ids);
        for (t2, &q2) in p2.iter().enumerate() {
            let joint = q1 * q2;
            second[t2] += joint;
            let mut ids = ids.clone();
            ids.push(t2 as u32);
            for (t3, p) in next(model, &ids).iter().enumerate() {
                third[t3] += joint * p;
            }
        }
    }
    (second, third)
}

fn total_variation(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / 2.0
}

#[test]
fn speculative_sampling_with_a_different_draft_model_matches_the_target() {
    let device = Device::Cpu;
    let target = Llama::random(config(2, 32), 11, &device).unwrap();
    let draft = Llama::random(config(1, 16), 29, &device).unwrap();
    let tokenizer = tokenizer();
    let prompt = [1u32, 5, 2];
    let (want_second, want_third) = exact_marginals(&target, &prompt);
    let (draft_second, _) = exact_marginals(&draft, &prompt);
    // The pair must disagree, or the test could not tell verification from none.
    assert!(
        total_variation(&want_second, &draft_second) > 0.1,
        "the random models agree too closely to test anything"
    );

    let runs = 4000;
    let (mut second, mut third) = (vec![0.0; VOCAB], vec![0.0; VOCAB]);
    let (mut proposed, mut accepted) = (0, 0);
    let mut drafter = ModelDrafter::new(draft, "random-draft");
    for seed in 0..runs {
        let options = GenerateOptions {
            max_tokens: 3,
            sampling: SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            },
            stop_at_eos: false,
        };
        dynexec_spec::drafter::Drafter::rollback(&mut drafter, 0).unwrap();
        let out = generate_speculative(
            &target,
            &mut drafter,
            &mut Fixed(2),
            &tokenizer,
            &prompt,
            &options,
            |_| Ok(()),
        )
        .unwrap();
        let ids = &out.generation.token_ids;
        assert_eq!(ids.len(), 3);
        second[ids[1] as usize] += 1.0 / runs as f64;
        third[ids[2] as usize] += 1.0 / runs as f64;
        proposed += out.spec.proposed;
        accepted += out.spec.accepted;
    }
    // Both paths of verification ran: accepted drafts and rejections.
    assert!(
        accepted > 0 && accepted < proposed,
        "{accepted} of {proposed}"
    );
    // With 4000 draws over 12 tokens the sampling error of the total variation is about 0.03.
    let (tv2, tv3) = (
        total_variation(&second, &want_second),
        total_variation(&third, &want_third),
    );
    assert!(
        tv2 < 0.05 && tv3 < 0.05,
        "token 2: {tv2:.3}, token 3: {tv3:.3}"
    );
}
