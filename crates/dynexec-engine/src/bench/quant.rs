//! The precision benchmark: one model in several weight formats side by side — weight bytes,
//! speed and quality (a decoder's perplexity on held-out text; an encoder's sentence
//! embeddings' cosine to the f32 model's), speed measured interleaved across formats.

use super::{run_generation, Contestant, Greedy, Row, NO_SAMPLES};
use dynexec_core::stats::{interleave, Summary};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::{Error, Result};
use dynexec_models::bert::Bert;
use dynexec_models::linear::WeightFormat;
use dynexec_models::llama::Llama;
use dynexec_models::quantize::quantize_in_place;
use dynexec_quant::perplexity::{perplexity, Window};
use serde::Serialize;
use std::time::Instant;

/// A decoder in one format.
#[derive(Debug, Clone, Serialize)]
pub struct QuantRow {
    /// The format.
    pub quant: WeightFormat,
    /// Bytes of the linear layers' weights.
    pub weights_bytes: usize,
    /// Median prefill tokens/s.
    pub prefill_tokens_per_s: f64,
    /// Median decode tokens/s.
    pub decode_tokens_per_s: f64,
    /// Perplexity of the held-out text.
    pub perplexity: f64,
    /// Tokens it scored.
    pub perplexity_tokens: usize,
    /// Prefill tokens/s over the runs.
    pub prefill: Summary,
    /// Decode tokens/s over the runs.
    pub decode: Summary,
}

/// Speed of every `(format, model)` on `prompt` and `gen_tokens` greedy steps, interleaved,
/// then each one's perplexity of `text_ids` in `window`. `on_run` hears each timed run's
/// format, `on_scored(done, total)` the perplexity's progress.
#[allow(clippy::too_many_arguments)]
pub fn bench_decoder_formats(
    models: &[(WeightFormat, &Llama)],
    prompt: &[u32],
    gen_tokens: usize,
    warmup: usize,
    runs: usize,
    text_ids: &[u32],
    window: Window,
    mut on_run: impl FnMut(WeightFormat),
    mut on_scored: impl FnMut(WeightFormat, usize, usize),
) -> Result<Vec<QuantRow>> {
    let mut contestants: Vec<Box<dyn Contestant + '_>> = models
        .iter()
        .map(|(_, model)| Box::new(Greedy(model)) as Box<dyn Contestant>)
        .collect();
    let mut run = 0;
    let speed = run_generation(&mut contestants, prompt, gen_tokens, warmup, runs, |_| {
        on_run(models[run % models.len()].0);
        run += 1;
    })?;
    let mut rows = Vec::with_capacity(models.len());
    for (
        &(format, model),
        Row {
            prefill, decode, ..
        },
    ) in models.iter().zip(speed)
    {
        let ppl = perplexity(model, text_ids, window, |done, total| {
            on_scored(format, done, total)
        })
        .map_err(|e| e.context(format!("perplexity at {format}")))?;
        rows.push(QuantRow {
            quant: format,
            weights_bytes: model.weight_bytes(),
            prefill_tokens_per_s: prefill.median,
            decode_tokens_per_s: decode.median,
            perplexity: ppl.perplexity,
            perplexity_tokens: ppl.tokens,
            prefill,
            decode,
        });
    }
    Ok(rows)
}

/// Real sentences from a text: split at sentence ends, fragments under 20 bytes dropped.
pub fn sentences_of(text: &str, count: usize) -> Vec<&str> {
    text.split_inclusive(['.', '?', '!'])
        .map(str::trim)
        .filter(|s| s.len() >= 20)
        .take(count)
        .collect()
}

/// An encoder in one format.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderRow {
    /// The format.
    pub quant: WeightFormat,
    /// Bytes of the linear layers' weights.
    pub weights_bytes: usize,
    /// Median sentences embedded per second.
    pub sentences_per_s: f64,
    /// Mean cosine similarity of each sentence embedding to the f32 model's.
    pub cosine_vs_f32: f64,
    /// The smallest of those cosines.
    pub min_cosine_vs_f32: f64,
    /// Sentences/s over the runs.
    pub speed: Summary,
}

/// Converts `reference` (an f32 encoder) to each format and embeds `sentences` with each,
/// interleaved, comparing every embedding with the reference's.
pub fn bench_encoder_formats(
    reference: &Bert,
    tokenizer: &TextTokenizer,
    sentences: &[&str],
    formats: &[WeightFormat],
    batch_size: usize,
    warmup: usize,
    runs: usize,
) -> Result<Vec<EncoderRow>> {
    if sentences.is_empty() {
        return Err(Error::InvalidArgument(
            "the text has no sentences of 20 characters or more".into(),
        ));
    }
    let expected = reference.sentence_embeddings(tokenizer, sentences, batch_size)?;
    let mut models = Vec::new();
    for &format in formats {
        let mut m = reference.clone();
        quantize_in_place(&mut m, format)?;
        models.push(m);
    }
    let mut embeddings = Vec::new();
    let speed = interleave(models.len(), warmup, runs, |i| {
        let start = Instant::now();
        let e = models[i].sentence_embeddings(tokenizer, sentences, batch_size)?;
        let secs = start.elapsed().as_secs_f64();
        if embeddings.len() < models.len() {
            embeddings.push(e);
        }
        Ok::<_, Error>(sentences.len() as f64 / secs)
    })?;
    let mut rows = Vec::new();
    for (i, m) in models.iter().enumerate() {
        // Both sides are unit vectors, so the row-wise dot product is the cosine.
        let cosines: Vec<f32> = (&embeddings[i] * &expected)?.sum(1)?.to_vec1()?;
        let speed = Summary::of(&speed[i]).unwrap_or(NO_SAMPLES);
        rows.push(EncoderRow {
            quant: formats[i],
            weights_bytes: m.weight_bytes(),
            sentences_per_s: speed.median,
            cosine_vs_f32: cosines.iter().map(|&c| c as f64).sum::<f64>() / cosines.len() as f64,
            min_cosine_vs_f32: cosines.iter().cloned().fold(f32::INFINITY, f32::min) as f64,
            speed,
        });
    }
    Ok(rows)
}
