//! The speculative decoding loop shared by `generate`, `bench` and the server.

use crate::drafter::Drafter;
use crate::lookahead::Lookahead;
use crate::verify::{verify_greedy, verify_sampling, Verdict};
use candle_core::{DType, D};
use dynexec_core::sampling::Sampler;
use dynexec_core::stats::{secs, GenerationStats};
use dynexec_core::tokenizer::{TextTokenizer, TokenStream};
use dynexec_core::{Error, Result};
use dynexec_models::generation::{check_prompt, GenerateOptions, Generation, StopReason};
use dynexec_models::llama::Llama;
use serde::Serialize;
use std::time::Instant;

/// What speculation did during one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpecStats {
    pub draft: String,
    pub lookahead: String,
    /// Verification steps (one target forward each), excluding the prefill.
    pub steps: usize,
    pub proposed: usize,
    pub accepted: usize,
    pub draft_forwards: usize,
    /// Target forwards including the prefill.
    pub target_forwards: usize,
    pub draft_secs: f64,
    pub verify_secs: f64,
}

impl SpecStats {
    /// Accepted drafts over proposed drafts.
    pub fn acceptance_rate(&self) -> f64 {
        if self.proposed == 0 {
            0.0
        } else {
            self.accepted as f64 / self.proposed as f64
        }
    }

    /// Drafts accepted per verification step.
    pub fn mean_accepted_length(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.accepted as f64 / self.steps as f64
        }
    }
}

/// A finished speculative generation.
pub struct SpecGeneration {
    pub generation: Generation,
    pub spec: SpecStats,
}

/// Generates from `prompt_ids` with `target`, drafting with `drafter`. The output is what
/// [`dynexec_models::generation::generate`] produces with the same options: greedy tokens
/// are identical, sampled ones follow the same distribution.
pub fn generate_speculative(
    target: &Llama,
    drafter: &mut dyn Drafter,
    lookahead: &mut dyn Lookahead,
    tokenizer: &TextTokenizer,
    prompt_ids: &[u32],
    options: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<SpecGeneration> {
    let context = target.config().context_length;
    check_prompt(target, prompt_ids, options)?;
    if options.sampling.repetition_penalty != 1.0 {
        return Err(Error::InvalidArgument(
            "--repeat-penalty cannot be combined with --draft yet (the penalty depends on each drafted position)".to_string(),
        ));
    }
    let greedy = options.sampling.is_greedy();
    let mut sampler = Sampler::new(options.sampling.clone())?;
    let mut cache = target.new_cache();
    let mut stream = TokenStream::new(tokenizer);
    let mut spec = SpecStats {
        draft: drafter.name(),
        lookahead: lookahead.name(),
        ..Default::default()
    };
    let mut stats = GenerationStats {
        prompt_tokens: prompt_ids.len(),
        ..Default::default()
    };
    let mut tokens = prompt_ids.to_vec();
    let mut generated: Vec<u32> = Vec::with_capacity(options.max_tokens);
    let mut text = String::new();

    let start = Instant::now();
    let logits = target.forward_last(prompt_ids, &mut cache, None)?;
    spec.target_forwards += 1;
    stats.prefill_secs = secs(start.elapsed());
    let first = sampler.sample(&logits, &tokens)?;
    stats.ttft_secs = secs(start.elapsed());
    let first_at = Instant::now();
    let mut last_at = first_at;
    // Tokens waiting to be emitted; the last one of `tokens` is never in the target's cache.
    let mut pending = vec![first];
    let mut stop_reason = StopReason::MaxTokens;

    'outer: loop {
        for token in pending.drain(..) {
            if options.stop_at_eos && tokenizer.is_eos(token) {
                stop_reason = StopReason::Eos;
                break 'outer;
            }
            generated.push(token);
            tokens.push(token);
            last_at = Instant::now();
            if let Some(piece) = stream.push(token)? {
                text.push_str(&piece);
                on_text(&piece)?;
            }
            if generated.len() >= options.max_tokens {
                break 'outer;
            }
            // Like plain decoding: a token at the last position can be emitted but not fed.
            if tokens.len() >= context {
                stop_reason = StopReason::ContextFull;
                break 'outer;
            }
        }
        // Never draft past max_tokens (the verification adds one token of its own) or past
        // the context (the verified tokens must fit in the target's cache).
        let room = (options.max_tokens - generated.len() - 1).min(context - tokens.len());
        let k = lookahead.next_k().min(room);
        let draft_start = Instant::now();
        let draft = if k > 0 {
            drafter.propose(
                &tokens,
                k,
                if greedy { None } else { Some(&mut sampler) },
                &*lookahead,
            )?
        } else {
            Default::default()
        };
        spec.draft_secs += secs(draft_start.elapsed());

        let verify_start = Instant::now();
        let base = tokens.len() - 1; // positions the target's cache holds
        let mut feed = Vec::with_capacity(draft.tokens.len() + 1);
        feed.push(tokens[base]);
        feed.extend_from_slice(&draft.tokens);
        let logits = target.forward(&feed, &mut cache, None)?; // (1 + drafts, vocab)
        spec.target_forwards += 1;
        let verdict = if greedy {
            let argmax: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            verify_greedy(&draft.tokens, &argmax)
        } else {
            let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
            let target_dists: Vec<Vec<f32>> =
                rows.iter().map(|r| sampler.distribution(r)).collect();
            verify_sampling(
                &draft.tokens,
                &target_dists,
                &draft.distributions,
                &mut sampler,
            )
        };
        let Verdict { accepted, next } = verdict;
        // Keep the cache entries of the last token and the accepted drafts only.
        cache.truncate(base + 1 + accepted)?;
        drafter.rollback(base + 1 + accepted)?;
        spec.verify_secs += secs(verify_start.elapsed());
        if !draft.tokens.is_empty() {
            spec.steps += 1;
            spec.proposed += draft.tokens.len();
            spec.accepted += accepted;
            lookahead.observe(&draft.confidences, accepted);
        }
        pending.extend_from_slice(&draft.tokens[..accepted]);
        pending.push(next);
    }
    if let Some(piece) = stream.finish()? {
        text.push_str(&piece);
        on_text(&piece)?;
    }
    stats.generated_tokens = generated.len();
    stats.decode_secs = secs(last_at.duration_since(first_at));
    spec.draft_forwards = drafter.forwards();
    Ok(SpecGeneration {
        generation: Generation {
            token_ids: generated,
            text,
            stop_reason,
            stats,
        },
        spec,
    })
}
