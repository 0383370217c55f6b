//! Capturing hidden states for analysis: the residual stream after every layer of a decoder
//! while it generates, of a decoder replaying another trace's tokens (so two systems see the
//! same text), or of an encoder over a text. `dynexec analyze` compares what these capture.

use dynexec_core::files::Resolve;
use dynexec_core::sampling::SamplingParams;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::trace::{Trace, TraceInfo};
use dynexec_core::{Error, Result};
use dynexec_dsa::Trajectories;
use dynexec_models::bert::{Bert, EncoderFiles};
use dynexec_models::generation::{generate, GenerateOptions};
use dynexec_models::llama::Llama;
use dynexec_models::loading::{load, LoadOptions};
use dynexec_models::quantize::{quantize_in_place, QuantTarget};
use std::path::Path;

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

/// Reads a saved trace (and its JSON sidecar) into per-layer trajectories, positions ×
/// features: the generated positions only, unless `include_prompt` (a prompt's first
/// positions carry outlier activations that dominate every metric).
pub fn read_trajectories(
    path: &Path,
    include_prompt: bool,
) -> Result<(TraceInfo, Vec<(usize, Trajectories)>)> {
    let (info, tensors) = Trace::load(path)?;
    let start = if include_prompt {
        0
    } else {
        info.prompt_tokens
    };
    let mut layers = Vec::new();
    for (layer, tensor) in tensors {
        let (positions, features) = tensor.dims2()?;
        if positions <= start + 2 {
            return Err(Error::InvalidArgument(format!(
                "the trace has {} positions after the {start} skipped: too few to analyse",
                positions.saturating_sub(start)
            )));
        }
        let values: Vec<f64> = tensor
            .narrow(0, start, positions - start)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        let trajectories = Trajectories::from_2d(positions - start, features, values)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        layers.push((layer, trajectories));
    }
    if layers.is_empty() {
        return Err(Error::InvalidArgument("the trace holds no layers".into()));
    }
    Ok((info, layers))
}

/// What a captured model reads.
pub enum TraceInput<'a> {
    /// A decoder generates `max_tokens` greedy tokens after `prompt` (as a user turn in its
    /// chat template when `chat`); an encoder reads `prompt`.
    Generate {
        /// The prompt text.
        prompt: &'a str,
        /// Wrap it in the model's chat template.
        chat: bool,
        /// Tokens a decoder generates.
        max_tokens: usize,
    },
    /// A decoder reads another trace's tokens (`prompt_tokens` of them the prompt); an
    /// encoder reads `text`.
    Replay {
        /// The other trace's tokens.
        token_ids: &'a [u32],
        /// How many of them are the prompt.
        prompt_tokens: usize,
        /// The text, for an encoder.
        text: &'a str,
    },
}

/// A trace and the tokens it covers.
pub struct Captured {
    /// Every layer's hidden states.
    pub trace: Trace,
    /// The tokens (prompt and generated).
    pub token_ids: Vec<u32>,
    /// How many of them are the prompt (0 for an encoder: all of its tokens are analysed).
    pub prompt_tokens: usize,
    /// Whether an encoder's tokenizer cut the text to its limit.
    pub truncated: bool,
}

/// Loads `reference` (a decoder, or a BERT-family encoder, converted per `options`) and
/// traces every layer over `input`; `on_token` hears each generated token.
pub fn capture(
    resolver: &dyn Resolve,
    device: &candle_core::Device,
    reference: &str,
    options: &LoadOptions,
    input: TraceInput<'_>,
    on_token: impl FnMut(),
) -> Result<Captured> {
    let files = resolver.resolve(reference)?;
    if EncoderFiles::is_encoder(&files) {
        let (mut model, tokenizer) =
            EncoderFiles::find(&files, options.tokenizer.as_deref())?.load(device)?;
        // Dense F32 layers already have the fast kernel: `auto` keeps them.
        if let Some(QuantTarget::To(format)) = options.quant {
            quantize_in_place(&mut model, format)
                .map_err(|e| e.context(format!("converting `{reference}` to {format}")))?;
        }
        let text = match input {
            TraceInput::Generate { prompt, .. } => prompt,
            TraceInput::Replay { text, .. } => text,
        };
        let ids = tokenizer.encode(text)?;
        return Ok(Captured {
            trace: trace_encoder(&model, &ids)?,
            truncated: tokenizer.truncation_limit() == Some(ids.len()),
            token_ids: ids,
            prompt_tokens: 0,
        });
    }
    let decoder = load(resolver, reference, device, options)?.decoder;
    match input {
        TraceInput::Generate {
            prompt,
            chat,
            max_tokens,
        } => {
            let tokenizer = &decoder.tokenizer;
            let text = match chat {
                true => tokenizer.chat_prompt(None, prompt)?,
                false => prompt.to_string(),
            };
            let prompt_ids = tokenizer.encode(&text)?;
            let (trace, token_ids) =
                trace_generation(&decoder.model, tokenizer, &prompt_ids, max_tokens, on_token)?;
            Ok(Captured {
                trace,
                token_ids,
                prompt_tokens: prompt_ids.len(),
                truncated: false,
            })
        }
        TraceInput::Replay {
            token_ids,
            prompt_tokens,
            ..
        } => Ok(Captured {
            trace: trace_tokens(&decoder.model, token_ids)?,
            token_ids: token_ids.to_vec(),
            prompt_tokens,
            truncated: false,
        }),
    }
}
