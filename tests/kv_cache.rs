//! Truncating a sequence's KV cache must be indistinguishable from never having run the
//! dropped tokens (speculative rollback depends on it).

mod common;

use candle_core::Device;
use common::{max_abs_diff, smollm2_gguf};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_models::llama::Llama;

#[test]
fn truncate_then_regenerate_equals_a_fresh_run() {
    let (model, content) = Llama::load_gguf(&smollm2_gguf(), &Device::Cpu).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&content).unwrap();
    let prompt = tokenizer
        .encode("A list of prime numbers: 2, 3, 5,")
        .unwrap();

    // Run the prompt, then 6 greedy tokens.
    let mut cache = model.new_cache();
    let mut logits = model.forward_last(&prompt, &mut cache, None).unwrap();
    let mut generated = Vec::new();
    for _ in 0..6 {
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        generated.push(next);
        logits = model.forward_last(&[next], &mut cache, None).unwrap();
    }
    assert_eq!(cache.len(), prompt.len() + 6);

    // Roll back 4 tokens and feed different ones (as a rejected speculation would).
    let keep = prompt.len() + 2;
    cache.truncate(keep).unwrap();
    assert_eq!(cache.len(), keep);
    for layer in 0..model.num_layers() {
        assert_eq!(cache.layer_len(layer), keep);
    }
    let detour = [11u32, 12, 13];
    let after_rollback = model.forward(&detour, &mut cache, None).unwrap();

    // A fresh sequence that never saw the dropped tokens, built the same way (prompt in one
    // pass, then the kept tokens one by one): the logits must be the same to the bit.
    let mut fresh = model.new_cache();
    model.forward(&prompt, &mut fresh, None).unwrap();
    for &token in &generated[..2] {
        model.forward(&[token], &mut fresh, None).unwrap();
    }
    let expected = model.forward(&detour, &mut fresh, None).unwrap();
    let diff = max_abs_diff(&after_rollback, &expected);
    assert!(diff < 1e-6, "rolled-back logits differ by {diff}");
}

#[test]
fn truncate_to_zero_and_past_the_end() {
    let (model, _) = Llama::load_gguf(&smollm2_gguf(), &Device::Cpu).unwrap();
    let mut cache = model.new_cache();
    model.forward(&[1, 2, 3], &mut cache, None).unwrap();
    cache.truncate(10).unwrap();
    assert_eq!(cache.len(), 3);
    cache.truncate(0).unwrap();
    assert!(cache.is_empty());
    let again = model.forward(&[1, 2, 3], &mut cache, None).unwrap();
    let mut fresh = model.new_cache();
    let expected = model.forward(&[1, 2, 3], &mut fresh, None).unwrap();
    assert_eq!(max_abs_diff(&again, &expected), 0.0);
}
