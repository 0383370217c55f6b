//! Capturing hidden states for analysis: the residual stream after every layer of a decoder
//! while it generates, of a decoder replaying another trace's tokens (so two systems see the
//! same text), or of an encoder over a text. `dynexec analyze` compares what these capture.

use dynexec_core::sampling::SamplingParams;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::trace::Trace;
use dynexec_core::{Error, Result};
use dynexec_models::bert::Bert;
use dynexec_models::generation::{generate, GenerateOptions};
use dynexec_models::llama::Llama;

/// Generates `max_tokens` greedy tokens after `prompt_ids` (end-of-sequence does not stop it,
/// so every run has the same length) with every layer traced; `on_text` hears each piece.
/// Returns the trace and every token (prompt and generated).
pub fn trace_generation(
    model: &Llama,
    tokenizer: &TextTokenizer,
    prompt_ids: &[u32],
    max_tokens: usize,
    mut on_text: impl FnMut(),
) -> Result<(Trace, Vec<u32>)> {
    let mut trace = Trace::new(0..=model.num_layers());
    let options = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::default(),
        stop_at_eos: false,
    };
    let generation = generate(
        model,
        tokenizer,
        prompt_ids,
        &options,
        Some(&mut trace),
        |_| {
            on_text();
            Ok(())
        },
    )?;
    let mut ids = prompt_ids.to_vec();
    ids.extend_from_slice(&generation.token_ids);
    Ok((trace, ids))
}

/// Runs `token_ids` (another trace's tokens) through `model` with every layer traced, so a
/// comparison isolates the model rather than what it would have generated instead.
pub fn trace_tokens(model: &Llama, token_ids: &[u32]) -> Result<Trace> {
    let vocab = model.config().vocab_size;
    if let Some(bad) = token_ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::InvalidArgument(format!(
            "token {bad} of the trace is outside the model's vocabulary of {vocab}: compare models with the same tokenizer"
        )));
    }
    let mut trace = Trace::new(0..=model.num_layers());
    let mut cache = model.new_cache();
    model.forward_last(token_ids, &mut cache, Some(&mut trace))?;
    Ok(trace)
}

/// An encoder's hidden states after every layer (0 = the embeddings) over `ids`.
pub fn trace_encoder(model: &Bert, ids: &[u32]) -> Result<Trace> {
    let limit = model.config().max_position_embeddings;
    if ids.len() > limit {
        return Err(Error::InvalidArgument(format!(
            "the text is {} tokens but the encoder takes at most {limit}: shorten it",
            ids.len()
        )));
    }
    let input = candle_core::Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let bias = model.attention_bias(&input.ones_like()?)?;
    let layers = model.num_layers();
    let mut trace = Trace::new(0..=layers);
    let mut hidden = model.embed(&input)?;
    trace.record(0, &hidden)?;
    for layer in 0..layers {
        hidden = model.forward_layers(&hidden, &bias, layer..layer + 1)?;
        trace.record(layer + 1, &hidden)?;
    }
    Ok(trace)
}
