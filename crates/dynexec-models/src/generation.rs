//! The decoding loop: prefill the prompt, then sample token by token, streaming text.

use crate::kv_cache::KvCache;
use crate::llama::Llama;
use crate::Result;
use dynexec_core::sampling::{Sampler, SamplingParams};
use dynexec_core::stats::{secs, GenerationStats};
use dynexec_core::tokenizer::{TextTokenizer, TokenStream};
use dynexec_core::trace::Trace;
use dynexec_core::Error;
use serde::Serialize;
use std::time::Instant;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingParams,
    /// Stop at the tokenizer's end-of-sequence ids (off for fixed-length benchmarks).
    pub stop_at_eos: bool,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_tokens`, stopping at end-of-sequence.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            sampling: SamplingParams::default(),
            stop_at_eos: true,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The model's context is full.
    ContextFull,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated tokens, without the prompt or an end-of-sequence token.
    pub token_ids: Vec<u32>,
    /// Their text, as streamed.
    pub text: String,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Token counts and timings.
    pub stats: GenerationStats,
}

/// A sequence being decoded: its tokens (prompt and generated) and its own KV cache.
pub struct Sequence {
    /// Prompt and generated tokens so far.
    pub tokens: Vec<u32>,
    /// Keys and values of the tokens the model has run.
    pub cache: KvCache,
}

impl Sequence {
    /// An empty sequence with an empty cache sized for `model`.
    pub fn new(model: &Llama) -> Self {
        Self {
            tokens: Vec::new(),
            cache: model.new_cache(),
        }
    }
}

/// Refuses an empty prompt, or one that leaves no room in the model's context.
pub fn check_prompt(model: &Llama, prompt_ids: &[u32], options: &GenerateOptions) -> Result<()> {
    let context = model.config().context_length;
    if prompt_ids.is_empty() {
        return Err(Error::InvalidArgument(
            "the prompt is empty: give some text to continue".to_string(),
        ));
    }
    if prompt_ids.len() >= context {
        return Err(Error::ContextOverflow {
            prompt_tokens: prompt_ids.len(),
            requested: options.max_tokens,
            context,
        });
    }
    Ok(())
}

/// Generates from `prompt_ids`, calling `on_text` with each piece of text as soon as it is
/// complete. An error from `on_text` stops generation and is returned.
pub fn generate(
    model: &Llama,
    tokenizer: &TextTokenizer,
    prompt_ids: &[u32],
    options: &GenerateOptions,
    trace: Option<&mut Trace>,
    on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    generate_with_step(
        model,
        tokenizer,
        prompt_ids,
        options,
        trace,
        |ids, cache, trace| model.forward_last(ids, cache, trace),
        on_text,
    )
}

/// [`generate`] with each decoding step (one new token → next-token logits) done by `step`,
/// e.g. a per-token early exit. The prompt is always prefilled at full depth.
pub fn generate_with_step(
    model: &Llama,
    tokenizer: &TextTokenizer,
    prompt_ids: &[u32],
    options: &GenerateOptions,
    mut trace: Option<&mut Trace>,
    mut step: impl FnMut(&[u32], &mut KvCache, Option<&mut Trace>) -> Result<candle_core::Tensor>,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    let context = model.config().context_length;
    check_prompt(model, prompt_ids, options)?;
    let mut sampler = Sampler::for_prompt(options.sampling.clone(), prompt_ids.len())?;
    let mut seq = Sequence::new(model);
    let mut stream = TokenStream::new(tokenizer);
    let mut stats = GenerationStats {
        prompt_tokens: prompt_ids.len(),
        ..Default::default()
    };
    let mut generated = Vec::with_capacity(options.max_tokens);
    let mut text = String::new();
    let mut stop_reason = StopReason::MaxTokens;

    let start = Instant::now();
    seq.tokens.extend_from_slice(prompt_ids);
    let mut logits = model.forward_last(prompt_ids, &mut seq.cache, trace.as_deref_mut())?;
    stats.prefill_secs = secs(start.elapsed());
    let mut first_token_at = None;
    let mut last_token_at = None;

    while generated.len() < options.max_tokens {
        let next = sampler.sample(&logits, &seq.tokens)?;
        if first_token_at.is_none() {
            first_token_at = Some(Instant::now());
            stats.ttft_secs = secs(start.elapsed());
        }
        if options.stop_at_eos && tokenizer.is_eos(next) {
            stop_reason = StopReason::Eos;
            break;
        }
        generated.push(next);
        seq.tokens.push(next);
        last_token_at = Some(Instant::now());
        if let Some(piece) = stream.push(next)? {
            text.push_str(&piece);
            on_text(&piece)?;
        }
        if generated.len() == options.max_tokens {
            break;
        }
        if seq.tokens.len() >= context {
            stop_reason = StopReason::ContextFull;
            break;
        }
        logits = step(&[next], &mut seq.cache, trace.as_deref_mut())?;
    }
    if let Some(piece) = stream.finish()? {
        text.push_str(&piece);
        on_text(&piece)?;
    }
    // Decode time spans the forwards that produced tokens 2..n (not a final EOS forward).
    if let (Some(first), Some(last)) = (first_token_at, last_token_at) {
        stats.decode_secs = secs(last.duration_since(first));
    }
    stats.generated_tokens = generated.len();
    Ok(Generation {
        token_ids: generated,
        text,
        stop_reason,
        stats,
    })
}
