//! The speculative decoding loop shared by `generate`, `bench` and the server.

use crate::drafter::{Draft, Drafter};
use crate::lookahead::Lookahead;
use crate::verify::{verify_greedy, verify_sampling, Verdict};
use candle_core::{DType, Tensor, D};
use dynexec_core::sampling::Sampler;
use dynexec_core::stats::{secs, GenerationStats};
use dynexec_core::tokenizer::{TextTokenizer, TokenStream};
use dynexec_core::{Error, Result};
use dynexec_models::generation::{check_prompt, GenerateOptions, Generation, StopReason};
use dynexec_models::kv_cache::KvCache;
use dynexec_models::llama::Llama;
use serde::Serialize;
use std::time::Instant;

/// What speculation did during one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpecStats {
    /// The drafter's name ([`Drafter::name`]).
    pub draft: String,
    /// The lookahead's name, e.g. `fixed:4`.
    pub lookahead: String,
    /// Verification steps (one target forward each), excluding the prefill.
    pub steps: usize,
    /// Draft tokens proposed.
    pub proposed: usize,
    /// Draft tokens the target accepted.
    pub accepted: usize,
    /// The drafter's forward passes (0 for model-free drafters).
    pub draft_forwards: usize,
    /// Target forwards including the prefill.
    pub target_forwards: usize,
    /// Seconds spent drafting.
    pub draft_secs: f64,
    /// Seconds spent in the target's verification forwards and the rollbacks after them.
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

/// Where a generated token came from: the speculative engine's record of the target's
/// verdict on each position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenOrigin {
    /// A draft token the target accepted.
    Accepted,
    /// The target's token where it rejected the draft's.
    Rejected,
    /// The target's token where nothing was drafted or every draft was accepted (and the
    /// first token, from the prefill).
    Target,
}

/// A finished speculative generation.
pub struct SpecGeneration {
    /// Tokens, text and timing, as a plain generation reports them.
    pub generation: Generation,
    /// What speculation did.
    pub spec: SpecStats,
    /// One entry per generated token: whether the target accepted a draft there.
    pub origins: Vec<TokenOrigin>,
}

/// One sequence being decoded speculatively, a verification step at a time: what
/// [`generate_speculative`] loops over, and what the server interleaves with other requests.
pub struct SpeculativeSequence<'a> {
    target: &'a Llama,
    pub(crate) drafter: Box<dyn Drafter + 'a>,
    pub(crate) lookahead: Box<dyn Lookahead + 'a>,
    pub(crate) sampler: Sampler,
    cache: KvCache,
    /// The prompt and every token handed out so far; the last one is never in the cache.
    pub(crate) tokens: Vec<u32>,
    pub(crate) greedy: bool,
    /// The drafter's forward count when this sequence started (a drafter may be reused).
    forwards_at_start: usize,
    /// The draft of a step between [`Self::draft`] and [`Self::verify`].
    pending: Option<Draft>,
    /// The origin of each token after the prompt.
    origins: Vec<TokenOrigin>,
    /// What speculation has done so far.
    pub spec: SpecStats,
}

impl<'a> SpeculativeSequence<'a> {
    /// Prefills the prompt and samples the first token, which is already in [`Self::tokens`].
    pub fn start(
        target: &'a Llama,
        drafter: Box<dyn Drafter + 'a>,
        lookahead: Box<dyn Lookahead + 'a>,
        prompt_ids: &[u32],
        options: &GenerateOptions,
    ) -> Result<(Self, u32)> {
        let mut sequence = Self::new(target, drafter, lookahead, prompt_ids, options)?;
        let logits = target.forward_last(prompt_ids, &mut sequence.cache, None)?;
        let first = sequence.begin(&logits)?;
        Ok((sequence, first))
    }

    /// A sequence for `prompt_ids` with nothing computed yet: the caller prefills the prompt
    /// on [`Self::cache_mut`] (in pieces, shared with other sequences, as it likes) and
    /// hands the last position's logits to [`Self::begin`].
    pub fn new(
        target: &'a Llama,
        drafter: Box<dyn Drafter + 'a>,
        lookahead: Box<dyn Lookahead + 'a>,
        prompt_ids: &[u32],
        options: &GenerateOptions,
    ) -> Result<Self> {
        check_prompt(target, prompt_ids, options)?;
        if let Some(setting) = options.sampling.logit_adjustment() {
            return Err(Error::setting(
                setting,
                "cannot be combined with speculative decoding yet (verification scores drafts without it)",
            ));
        }
        lookahead.check_pair(target, &drafter.name())?;
        let sampler = Sampler::for_prompt(options.sampling.clone(), prompt_ids.len())?;
        let spec = SpecStats {
            draft: drafter.name(),
            lookahead: lookahead.name(),
            ..Default::default()
        };
        Ok(Self {
            forwards_at_start: drafter.forwards(),
            pending: None,
            origins: Vec::new(),
            target,
            drafter,
            lookahead,
            greedy: options.sampling.is_greedy(),
            sampler,
            cache: target.new_cache(),
            tokens: prompt_ids.to_vec(),
            spec,
        })
    }

    /// Lets the draft read the prompt's first `len` tokens ahead of its first draft, so a
    /// long prompt reaches the draft in the same pieces as the target.
    pub fn prefill_draft(&mut self, len: usize) -> Result<()> {
        self.drafter
            .prefill(&self.tokens[..len.min(self.tokens.len())])
    }

    /// Samples the first token from the logits `(vocab,)` of the prompt's last position, once
    /// the whole prompt is in [`Self::cache_mut`], and appends it to [`Self::tokens`].
    pub fn begin(&mut self, logits: &Tensor) -> Result<u32> {
        let first = self.sampler.sample(logits, &self.tokens)?;
        self.spec.target_forwards += 1;
        self.tokens.push(first);
        self.origins.push(TokenOrigin::Target);
        Ok(first)
    }

    /// The prompt and the tokens produced so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The origin of each token produced so far (after the prompt).
    pub fn origins(&self) -> &[TokenOrigin] {
        &self.origins
    }

    /// One draft-and-verify step proposing at most `max_drafts` tokens. Returns the accepted
    /// drafts and the target's own next token (1 to `max_drafts + 1` tokens), already
    /// appended to [`Self::tokens`]. `max_drafts` must leave room in the context for them.
    pub fn step(&mut self, max_drafts: usize) -> Result<Vec<u32>> {
        let feed = self.draft(max_drafts)?;
        let verify_start = Instant::now();
        let logits = self.target.forward(&feed, &mut self.cache, None)?;
        self.spec.verify_secs += secs(verify_start.elapsed());
        self.verify(&logits)
    }

    /// The first half of a step, for a forward shared with other sequences: drafts at most
    /// `max_drafts` tokens (none when 0: the step then decodes one token plainly) and returns
    /// the rows the target must run, the last token and the drafts, on [`Self::cache_mut`].
    /// [`Self::verify`] takes their logits.
    pub fn draft(&mut self, max_drafts: usize) -> Result<Vec<u32>> {
        let k = self.draft_budget(max_drafts);
        let draft_start = Instant::now();
        let draft = if k > 0 {
            let sampler = if self.greedy {
                None
            } else {
                Some(&mut self.sampler)
            };
            self.drafter
                .propose(&self.tokens, k, sampler, &*self.lookahead)?
        } else {
            Default::default()
        };
        self.spec.draft_secs += secs(draft_start.elapsed());
        Ok(self.hold_draft(draft))
    }

    /// How many tokens the next step may draft: the lookahead's choice, within
    /// `max_drafts` and the context.
    pub(crate) fn draft_budget(&self, max_drafts: usize) -> usize {
        let room = self
            .target
            .config()
            .context_length
            .saturating_sub(self.tokens.len());
        self.lookahead.next_k().min(max_drafts).min(room)
    }

    /// Keeps `draft` for [`Self::verify`] and returns the rows the target must run.
    pub(crate) fn hold_draft(&mut self, draft: Draft) -> Vec<u32> {
        let base = self.tokens.len() - 1; // positions the target's cache holds
        let mut feed = Vec::with_capacity(draft.tokens.len() + 1);
        feed.push(self.tokens[base]);
        feed.extend_from_slice(&draft.tokens);
        self.pending = Some(draft);
        feed
    }

    /// The target's cache, for a forward of [`Self::draft`]'s rows shared with others.
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// The second half of a step: `logits` `(1 + drafts, vocab)` are the target's for the
    /// rows [`Self::draft`] returned, already run on [`Self::cache_mut`]. Accepts a prefix
    /// of the drafts, adds the target's own token, rolls both caches back to what was kept,
    /// and returns the new tokens (already appended to [`Self::tokens`]).
    pub fn verify(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        let draft = self.pending.take().ok_or_else(|| {
            Error::InvalidArgument("a speculative step verifies after it drafts".into())
        })?;
        let verify_start = Instant::now();
        let base = self.tokens.len() - 1;
        self.spec.target_forwards += 1;
        let verdict = if self.greedy {
            let argmax: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            verify_greedy(&draft.tokens, &argmax)
        } else {
            let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
            let target_dists: Vec<Vec<f32>> =
                rows.iter().map(|r| self.sampler.distribution(r)).collect();
            verify_sampling(
                &draft.tokens,
                &target_dists,
                &draft.distributions,
                &mut self.sampler,
            )
        };
        let Verdict { accepted, next } = verdict;
        // Keep the cache entries of the last token and the accepted drafts only.
        self.cache.truncate(base + 1 + accepted)?;
        self.drafter.rollback(base + 1 + accepted)?;
        self.spec.verify_secs += secs(verify_start.elapsed());
        if !draft.tokens.is_empty() {
            self.spec.steps += 1;
            self.spec.proposed += draft.tokens.len();
            self.spec.accepted += accepted;
            self.lookahead.observe(&draft.signals, accepted);
        }
        let mut out = draft.tokens[..accepted].to_vec();
        out.push(next);
        self.origins
            .extend(std::iter::repeat_n(TokenOrigin::Accepted, accepted));
        self.origins.push(if accepted < draft.tokens.len() {
            TokenOrigin::Rejected
        } else {
            TokenOrigin::Target
        });
        self.tokens.extend_from_slice(&out);
        self.spec.draft_forwards = self.drafter.forwards() - self.forwards_at_start;
        Ok(out)
    }
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
    let mut stream = TokenStream::new(tokenizer);
    let mut stats = GenerationStats {
        prompt_tokens: prompt_ids.len(),
        ..Default::default()
    };
    let mut generated: Vec<u32> = Vec::with_capacity(options.max_tokens);
    let mut text = String::new();

    let start = Instant::now();
    let (mut sequence, first) = SpeculativeSequence::start(
        target,
        Box::new(drafter),
        Box::new(lookahead),
        prompt_ids,
        options,
    )?;
    stats.ttft_secs = secs(start.elapsed());
    stats.prefill_secs = stats.ttft_secs;
    let first_at = Instant::now();
    let mut last_at = first_at;
    let mut pending = vec![first];
    let mut stop_reason = StopReason::MaxTokens;

    'outer: loop {
        for token in pending.drain(..) {
            if options.stop_at_eos && tokenizer.is_eos(token) {
                stop_reason = StopReason::Eos;
                break 'outer;
            }
            generated.push(token);
            last_at = Instant::now();
            if let Some(piece) = stream.push(token)? {
                text.push_str(&piece);
                on_text(&piece)?;
            }
            if generated.len() >= options.max_tokens {
                break 'outer;
            }
            // Like plain decoding: a token at the last position can be emitted but not fed.
            if prompt_ids.len() + generated.len() >= context {
                stop_reason = StopReason::ContextFull;
                break 'outer;
            }
        }
        // Never draft past max_tokens (the verification adds one token of its own).
        pending = sequence.step(options.max_tokens - generated.len() - 1)?;
    }
    if let Some(piece) = stream.finish()? {
        text.push_str(&piece);
        on_text(&piece)?;
    }
    stats.generated_tokens = generated.len();
    stats.decode_secs = secs(last_at.duration_since(first_at));
    let origins = sequence.origins[..generated.len().min(sequence.origins.len())].to_vec();
    Ok(SpecGeneration {
        generation: Generation {
            token_ids: generated,
            text,
            stop_reason,
            stats,
        },
        origins,
        spec: sequence.spec,
    })
}
