//! Speculative decoding is lossless: greedy output equals plain greedy decoding for every
//! drafter and controller, and sampled output follows the target's distribution.

mod common;

use candle_core::{DType, Device};
use common::{smollm2_gguf, write_random_llama};
use dynexec_core::sampling::SamplingParams;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_models::generation::{generate, GenerateOptions, StopReason};
use dynexec_models::llama::Llama;
use dynexec_quant::{quantize_in_place, WeightFormat};
use dynexec_spec::drafter::{check_vocab, ChainDrafter, Drafter, ModelDrafter, NgramDrafter};
use dynexec_spec::engine::{generate_speculative, TokenOrigin};
use dynexec_spec::lookahead::{self, Lookahead};

fn random_llama(dir: &std::path::Path, vocab: usize) -> Llama {
    write_random_llama(dir, false, false, vocab);
    let weights = vec![dir.join("model.safetensors")];
    Llama::load_safetensors(&dir.join("config.json"), &weights, DType::F32, &Device::Cpu).unwrap()
}

/// SmolLM2's tokenizer stands in for the random models' (only ids are compared).
fn tokenizer() -> TextTokenizer {
    let mut file = std::fs::File::open(smollm2_gguf()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    TextTokenizer::from_gguf(&content).unwrap()
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams::default(),
        stop_at_eos: false,
    }
}

const CONTROLLERS: [&str; 4] = ["fixed:1", "fixed:4", "heuristic", "confidence"];

fn assert_lossless(
    target: &Llama,
    drafter: &mut dyn Drafter,
    controller: &str,
    tok: &TextTokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
) -> f64 {
    let plain = generate(target, tok, prompt, options, None, |_| Ok(())).unwrap();
    let mut la: Box<dyn Lookahead> = lookahead::parse(controller).unwrap();
    let spec = generate_speculative(target, drafter, la.as_mut(), tok, prompt, options, |_| {
        Ok(())
    })
    .unwrap();
    assert_eq!(
        spec.generation.token_ids,
        plain.token_ids,
        "{} with {controller}: speculative greedy output differs from plain greedy",
        drafter.name()
    );
    assert_eq!(spec.generation.text, plain.text);
    // The per-token record agrees with the counts: one origin per token, each rejection
    // ends a step, and no more accepted tokens than drafts accepted.
    let origins = &spec.origins;
    assert_eq!(origins.len(), spec.generation.token_ids.len());
    assert_eq!(origins.first(), Some(&TokenOrigin::Target));
    let count = |o: TokenOrigin| origins.iter().filter(|&&x| x == o).count();
    assert!(count(TokenOrigin::Accepted) <= spec.spec.accepted);
    assert!(count(TokenOrigin::Rejected) <= spec.spec.steps);
    if spec.spec.accepted < spec.spec.proposed {
        assert!(count(TokenOrigin::Rejected) > 0, "{origins:?}");
    }
    spec.spec.acceptance_rate()
}

#[test]
fn greedy_is_lossless_on_random_models_for_every_drafter_and_controller() {
    let tok = tokenizer();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let vocab = 64;
    let target = random_llama(a.path(), vocab);
    let other = random_llama(b.path(), vocab);
    check_vocab(&target, &other).unwrap();
    let prompt: Vec<u32> = vec![3, 17, 42, 8, 8, 1, 33, 20, 3, 17];
    let options = greedy(40);
    for controller in CONTROLLERS {
        let mut drafters: Vec<Box<dyn Drafter>> = vec![
            Box::new(ModelDrafter::new(other.clone(), "random draft")),
            Box::new(ModelDrafter::new(target.clone(), "self")),
            Box::new(ModelDrafter::with_depth(target.clone(), 1, "self-layers:1")),
            Box::new(NgramDrafter::new(3, 8)),
            // Prompt lookup first, the draft model where no n-gram matches: both kinds of
            // proposal in one sequence, and the model's cache catching up between them.
            Box::new(ChainDrafter::new(
                Box::new(NgramDrafter::new(3, 8)),
                Box::new(ModelDrafter::new(other.clone(), "random draft")),
            )),
        ];
        for drafter in drafters.iter_mut() {
            let rate = assert_lossless(
                &target,
                drafter.as_mut(),
                controller,
                &tok,
                &prompt,
                &options,
            );
            if drafter.name() == "self" {
                // The target drafting for itself is always right: a check on the rollback.
                assert_eq!(rate, 1.0, "self-draft with {controller}");
            }
        }
    }
}

#[test]
fn drafts_stop_at_the_context_and_mismatched_vocabularies_are_refused() {
    let tok = tokenizer();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let target = random_llama(a.path(), 64); // context 128
    let prompt: Vec<u32> = (0..120).map(|i| (i * 7 % 64) as u32).collect();
    let options = greedy(30);
    let plain = generate(&target, &tok, &prompt, &options, None, |_| Ok(())).unwrap();
    assert_eq!(plain.stop_reason, StopReason::ContextFull);
    let mut drafter = ModelDrafter::new(target.clone(), "self");
    let mut la = lookahead::parse("fixed:8").unwrap();
    let spec = generate_speculative(
        &target,
        &mut drafter,
        la.as_mut(),
        &tok,
        &prompt,
        &options,
        |_| Ok(()),
    )
    .unwrap();
    assert_eq!(spec.generation.token_ids, plain.token_ids);
    assert_eq!(spec.generation.stop_reason, StopReason::ContextFull);

    let other = random_llama(b.path(), 50);
    let err = check_vocab(&target, &other).unwrap_err().to_string();
    assert!(
        err.contains("vocabulary has 50 tokens but the target's has 64"),
        "{err}"
    );
}

#[test]
fn greedy_is_lossless_on_smollm2() {
    let (mut target, content) = Llama::load_gguf(&smollm2_gguf(), &Device::Cpu).unwrap();
    let tok = TextTokenizer::from_gguf(&content).unwrap();
    quantize_in_place(&mut target, WeightFormat::Q8_0).unwrap();
    let article = "The city council approved a new plan on Tuesday to expand the bus network. The plan adds \
        twelve routes and extends service hours until midnight. Council members said the bus network had not \
        changed in twenty years, while the city grew by a third. The plan will cost 40 million dollars over five years.";
    let prompt = tok
        .encode(
            &tok.chat_prompt(None, &format!("Summarize: {article}"))
                .unwrap(),
        )
        .unwrap();
    let options = greedy(40);
    let mut quant_copy = target.clone();
    quantize_in_place(&mut quant_copy, WeightFormat::Q4_0).unwrap();
    let cases: Vec<(Box<dyn Drafter>, &str)> = vec![
        (Box::new(NgramDrafter::new(3, 10)), "fixed:4"),
        (
            Box::new(ModelDrafter::new(quant_copy, "self-quant:q4_0")),
            "heuristic",
        ),
        (
            Box::new(ModelDrafter::with_depth(
                target.clone(),
                10,
                "self-layers:10",
            )),
            "confidence",
        ),
    ];
    for (mut drafter, controller) in cases {
        let rate = assert_lossless(
            &target,
            drafter.as_mut(),
            controller,
            &tok,
            &prompt,
            &options,
        );
        eprintln!("{} / {controller}: acceptance {rate:.2}", drafter.name());
    }
}

/// Exact probabilities of the target's next token after `prefix`, at temperature 1.
fn next_token_distribution(model: &Llama, prefix: &[u32]) -> Vec<f32> {
    let logits = model
        .forward_last(prefix, &mut model.new_cache(), None)
        .unwrap();
    candle_nn::ops::softmax_last_dim(&logits)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn speculative_sampling_follows_the_target_distribution() {
    let tok = tokenizer();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let vocab = 8;
    let target = random_llama(a.path(), vocab);
    let draft = random_llama(b.path(), vocab);
    let prompt = [1u32, 2, 3];
    // Exact joint distribution of the first two tokens: p(t0) p(t1 | t0); and what accepting
    // every draft would give instead, p(t0) q(t1 | t0).
    let p0 = next_token_distribution(&target, &prompt);
    let mut exact = vec![0f64; vocab * vocab];
    let mut always_accept = vec![0f64; vocab * vocab];
    for t0 in 0..vocab {
        let prefix = [1u32, 2, 3, t0 as u32];
        let p1 = next_token_distribution(&target, &prefix);
        let q1 = next_token_distribution(&draft, &prefix);
        for t1 in 0..vocab {
            exact[t0 * vocab + t1] = (p0[t0] * p1[t1]) as f64;
            always_accept[t0 * vocab + t1] = (p0[t0] * q1[t1]) as f64;
        }
    }
    let runs = 4000;
    let mut counts = vec![0usize; vocab * vocab];
    let mut drafter = ModelDrafter::new(draft.clone(), "random draft");
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
        drafter.rollback(0).unwrap();
        let mut la = lookahead::parse("fixed:1").unwrap();
        let out = generate_speculative(
            &target,
            &mut drafter,
            la.as_mut(),
            &tok,
            &prompt,
            &options,
            |_| Ok(()),
        )
        .unwrap();
        let ids = &out.generation.token_ids;
        counts[ids[0] as usize * vocab + ids[1] as usize] += 1;
    }
    let empirical: Vec<f64> = counts.iter().map(|&c| c as f64 / runs as f64).collect();
    let tv = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / 2.0;
    // 64 cells and 4000 draws: the sampling error of the TV distance is about 0.05.
    let bound = 0.09;
    let observed = tv(&empirical, &exact);
    assert!(
        observed < bound,
        "speculative samples are off the target by TV {observed}"
    );
    // The test can tell a wrong rule apart: accepting every draft would land this far away.
    let wrong = tv(&always_accept, &exact);
    assert!(
        wrong > 2.0 * bound,
        "draft and target are too alike for this test (TV {wrong})"
    );
}
