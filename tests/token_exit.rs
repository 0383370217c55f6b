//! Per-token early exit (CALM) on SmolLM2: the skipped layers' keys and values are exactly
//! what those layers would compute from the exit state, a threshold above 1 is plain
//! decoding, and an always-exit policy answers from the first exit's adapter.

mod common;

use candle_core::{Device, Tensor};
use dynexec_core::sampling::SamplingParams;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_exit::token_exit::{ExitAdapters, TokenExit, TokenExitPolicy};
use dynexec_hub::Hub;
use dynexec_models::generation::{generate, generate_with_step, GenerateOptions};
use dynexec_models::llama::{load_decoder, Llama};

fn smollm2() -> (Llama, TextTokenizer) {
    let loaded = load_decoder(&common::smollm2_files(), None, None, &Device::Cpu).unwrap();
    (loaded.model, loaded.tokenizer)
}

fn committed_adapters(model: &Llama) -> ExitAdapters {
    let mut hub = Hub::from_env().unwrap();
    hub.progress = false;
    let files = hub
        .resolve("smollm2-135m-instruct-exits")
        .expect("run `dynexec models pull smollm2-135m-instruct-exits`");
    let dir = files
        .find("adapters.json")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let adapters = ExitAdapters::load(&dir, &Device::Cpu).unwrap();
    adapters.check(model).unwrap();
    adapters
}

#[test]
fn filled_keys_and_values_equal_the_layers_own() {
    let (model, tokenizer) = smollm2();
    let ids = tokenizer.encode("The quick brown fox jumps over").unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut warm = model.new_cache();
    let hidden = model
        .forward_layers(&model.embed(&input).unwrap(), 0..7, &mut warm, None)
        .unwrap();
    // Layer 7 run normally vs only its keys and values filled, from the same state.
    let (mut run, mut filled) = (warm.clone(), warm.clone());
    model.forward_layers(&hidden, 7..8, &mut run, None).unwrap();
    model.fill_kv(&hidden, 7..8, &mut filled).unwrap();
    let (k_run, v_run) = run.layer(7).unwrap();
    let (k_fill, v_fill) = filled.layer(7).unwrap();
    assert_eq!(common::max_abs_diff(&k_run, &k_fill), 0.0);
    assert_eq!(common::max_abs_diff(&v_run, &v_fill), 0.0);
    assert!(
        model.fill_kv(&hidden, 7..31, &mut filled).is_err(),
        "past the last layer"
    );
}

#[test]
fn threshold_above_one_is_plain_decoding_and_zero_exits_at_the_first_adapter() {
    let (model, tokenizer) = smollm2();
    let adapters = committed_adapters(&model);
    let prompt = tokenizer
        .encode(&tokenizer.chat_prompt(None, "Name three colours.").unwrap())
        .unwrap();
    let options = GenerateOptions {
        max_tokens: 24,
        sampling: SamplingParams::default(),
        stop_at_eos: false,
    };
    let plain = generate(&model, &tokenizer, &prompt, &options, None, |_| Ok(())).unwrap();
    for policy in ["confidence:1.5", "saturation:1.5"] {
        let mut exit =
            TokenExit::new(&model, &adapters, TokenExitPolicy::parse(policy).unwrap()).unwrap();
        let out = generate_with_step(
            &model,
            &tokenizer,
            &prompt,
            &options,
            None,
            |ids, cache, _| exit.step(ids, cache),
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(out.token_ids, plain.token_ids, "{policy}");
        assert!(exit.exit_layers.iter().all(|&l| l == 30), "{policy}");
    }

    // Always exit: every token leaves at the first exit layer, with that adapter's logits, and
    // every layer's cache still covers every position.
    let first = adapters.card.layers[0];
    let mut exit = TokenExit::new(
        &model,
        &adapters,
        TokenExitPolicy::parse("confidence:0:propagate").unwrap(),
    )
    .unwrap();
    let mut cache = model.new_cache();
    let mut logits = exit.step(&prompt, &mut cache).unwrap();
    let mut tokens = prompt.clone();
    for _ in 0..6 {
        tokens.push(Llama::argmax_rows(&logits.unsqueeze(0).unwrap()).unwrap()[0]);
        logits = exit.step(&tokens[tokens.len() - 1..], &mut cache).unwrap();
        // The same exit computed from scratch over the whole sequence (layers below the exit
        // never skip, so their caches hold real keys and values).
        let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = model
            .forward_layers(
                &model.embed(&input).unwrap(),
                0..first,
                &mut model.new_cache(),
                None,
            )
            .unwrap();
        let last = h.narrow(1, h.dim(1).unwrap() - 1, 1).unwrap();
        let expected = adapters.exit_logits(&model, 0, &last).unwrap();
        // Incremental and whole-sequence attention sum in different orders: ~1e-3 on logits
        // of magnitude ~20.
        let diff = common::max_abs_diff(&logits, &expected);
        assert!(diff < 1e-2, "{diff}");
        assert_eq!(
            Llama::argmax_rows(&logits.unsqueeze(0).unwrap()).unwrap(),
            Llama::argmax_rows(&expected.unsqueeze(0).unwrap()).unwrap()
        );
    }
    assert!(exit.exit_layers.iter().all(|&l| l == first));
    for layer in 0..model.num_layers() {
        assert_eq!(cache.layer_len(layer), tokens.len(), "layer {layer}");
    }
}

/// Under `:defer` an always-exit policy leaves the layers above the exit waiting: they hold
/// only the prompt's positions, and the cache belongs to that stepper alone.
#[test]
fn deferred_layers_wait_and_stay_with_their_cache() {
    let (model, tokenizer) = smollm2();
    let adapters = committed_adapters(&model);
    let first = adapters.card.layers[0];
    let prompt = tokenizer.encode("The quick brown fox jumps over").unwrap();
    let mut exit = TokenExit::new(
        &model,
        &adapters,
        TokenExitPolicy::parse("confidence:0").unwrap(),
    )
    .unwrap();
    let mut cache = model.new_cache();
    let mut logits = exit.step(&prompt, &mut cache).unwrap();
    let mut tokens = prompt.clone();
    for _ in 0..4 {
        tokens.push(Llama::argmax_rows(&logits.unsqueeze(0).unwrap()).unwrap()[0]);
        logits = exit.step(&tokens[tokens.len() - 1..], &mut cache).unwrap();
    }
    for layer in 0..model.num_layers() {
        let expected = if layer < first {
            tokens.len()
        } else {
            prompt.len()
        };
        assert_eq!(cache.layer_len(layer), expected, "layer {layer}");
    }
    let err = exit.step(&tokens[..1], &mut model.new_cache()).unwrap_err();
    assert!(
        err.to_string().contains("one TokenExit per sequence"),
        "{err}"
    );
}

/// Deferred skipped layers leave no trace on later tokens: every token that runs the full
/// depth after others exited gets exactly the logits plain decoding gives it, because the
/// exited positions' skipped layers ran with it.
#[test]
fn deferred_layers_keep_full_depth_tokens_exact() {
    use dynexec_exit::token_exit::{ExitAdapters, TokenExit, TokenExitPolicy};
    let mut hub = dynexec_hub::Hub::from_env().unwrap();
    hub.progress = false;
    let device = candle_core::Device::Cpu;
    let files = hub.resolve("smollm2-135m-instruct").unwrap();
    let loaded = dynexec_models::llama::load_decoder(&files, None, None, &device).unwrap();
    let model = &loaded.model;
    let adapters_dir = hub.resolve("smollm2-135m-instruct-exits").unwrap();
    let adapters = ExitAdapters::load(
        adapters_dir
            .find("adapters.json")
            .unwrap()
            .parent()
            .unwrap(),
        &device,
    )
    .unwrap();
    let ids = loaded
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog, and then it runs back home to sleep in the warm sun.")
        .unwrap();
    let prompt = 4;
    let plain: Vec<Vec<f32>> = {
        let mut cache = model.new_cache();
        let mut out = vec![model
            .forward_last(&ids[..prompt], &mut cache, None)
            .unwrap()
            .to_vec1()
            .unwrap()];
        for &id in &ids[prompt..] {
            out.push(
                model
                    .forward_last(&[id], &mut cache, None)
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            );
        }
        out
    };
    let depth = model.num_layers();
    let mut checked_after_exits = 0;
    for spec in ["classifier:0.6", "saturation:0.95"] {
        let mut exit =
            TokenExit::new(model, &adapters, TokenExitPolicy::parse(spec).unwrap()).unwrap();
        let mut cache = model.new_cache();
        exit.step(&ids[..prompt], &mut cache).unwrap();
        for (step, &id) in ids[prompt..].iter().enumerate() {
            let logits: Vec<f32> = exit.step(&[id], &mut cache).unwrap().to_vec1().unwrap();
            let exits_before = exit.exit_layers[..step]
                .iter()
                .filter(|&&l| l < depth)
                .count();
            if exit.exit_layers[step] == depth && exits_before > 0 {
                let diff = logits
                    .iter()
                    .zip(&plain[step + 1])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-3, "{spec} step {step}: logits differ by {diff}");
                checked_after_exits += 1;
            }
        }
        assert!(
            exit.exit_layers.iter().any(|&l| l < depth),
            "{spec}: no token exited, so nothing was deferred: {:?}",
            exit.exit_layers
        );
    }
    assert!(
        checked_after_exits > 0,
        "no full-depth token followed an exit"
    );
}
