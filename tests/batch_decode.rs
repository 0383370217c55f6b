//! A batched decoding step (`Llama::forward_batch`, what the server runs for concurrent
//! requests) must give each sequence what decoding it alone gives.

mod common;

use candle_core::Device;
use common::{max_abs_diff, smollm2_gguf};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_models::llama::Llama;

#[test]
fn a_batched_step_matches_each_sequence_decoded_alone() {
    let (model, content) = Llama::load_gguf(&smollm2_gguf(), &Device::Cpu).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&content).unwrap();
    // Prompts of different lengths: every row attends over its own cache.
    let prompts = [
        "The quick brown fox",
        "In a hole in the ground there lived",
        "1, 2, 3,",
        "Photosynthesis converts light into",
    ];
    let mut alone = Vec::new();
    let mut batched = Vec::new();
    let mut next = Vec::new();
    for p in prompts {
        let ids = tokenizer.encode(p).unwrap();
        let mut cache = model.new_cache();
        let logits = model.forward_last(&ids, &mut cache, None).unwrap();
        next.push(logits.argmax(0).unwrap().to_scalar::<u32>().unwrap());
        batched.push(cache.clone());
        alone.push(cache);
    }
    // Eight steps: one token per sequence per step, batched versus one at a time.
    for _ in 0..8 {
        let mut caches: Vec<_> = batched.iter_mut().collect();
        let rows = model.forward_batch(&next, &mut caches).unwrap();
        assert_eq!(rows.dims(), &[prompts.len(), model.vocab_size()]);
        for (i, cache) in alone.iter_mut().enumerate() {
            let single = model.forward_last(&[next[i]], cache, None).unwrap();
            let row = rows.get(i).unwrap();
            let diff = max_abs_diff(&row, &single);
            assert!(diff < 1e-3, "row {i}: batched logits differ by {diff}");
            let (a, b) = (
                row.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
                single.argmax(0).unwrap().to_scalar::<u32>().unwrap(),
            );
            assert_eq!(a, b, "row {i}: greedy tokens differ");
            next[i] = a;
        }
    }
    for (a, b) in alone.iter().zip(&batched) {
        assert_eq!(a.len(), b.len());
    }
    // A mismatched call is an error, not a panic.
    let mut caches: Vec<_> = batched.iter_mut().collect();
    assert!(model.forward_batch(&next[..2], &mut caches).is_err());
    assert!(model.forward_batch(&[u32::MAX; 4], &mut caches).is_err());
}
