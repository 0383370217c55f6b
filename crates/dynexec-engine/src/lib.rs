//! dynexec-engine: how one sequence is decoded, chosen once and used by every front-end.
//!
//! Which decoding strategy should a request get, and what did it do? A [`Strategy`] is plain
//! decoding, per-token early exit (CALM, Schuster et al. 2022) or speculative decoding
//! (Leviathan et al. 2023) with a drafter and a lookahead. [`decode`] runs a whole generation
//! with one (what `generate` and the benchmarks do); [`Sequence`] advances one a step at a
//! time (what the server's scheduler interleaves: [`batch_rows`] puts every plain and
//! speculative sequence's rows into one target forward, drafting together where they share a
//! draft model). Both report in one
//! type, [`DecodeReport`], which front-ends show as they like. [`bench`] times decoders
//! against each other (dynexec, candle-transformers, llama.cpp) the way `bench generate` does;
//! [`trace`] captures hidden states at every layer for analysis.
//!
//! ```no_run
//! # fn main() -> dynexec_core::Result<()> {
//! use dynexec_hub::Hub;
//! use dynexec_engine::{decode, Strategy};
//! use dynexec_models::generation::GenerateOptions;
//! use dynexec_models::loading::{load, LoadOptions};
//! use dynexec_spec::draft_spec::{DraftSources, DraftSpec};
//!
//! let (hub, device) = (Hub::from_env()?, candle_core::Device::Cpu);
//! let target = load(&hub, "smollm2-135m-instruct", &device, &LoadOptions::default())?.decoder;
//! let sources = DraftSources { hub: &hub, device: &device, load_options: LoadOptions::default(), draft_quant: None, exit_adapters: None, draft_vocab: None };
//! let drafter = "ngram".parse::<DraftSpec>()?.build(&target, &sources)?;
//! let mut strategy = Strategy::Speculative {
//!     drafter,
//!     lookahead: dynexec_spec::lookahead::parse("heuristic")?,
//! };
//! let prompt = target.tokenizer.encode("def fib(n):")?;
//! let out = decode(&target.model, &target.tokenizer, &prompt, &GenerateOptions::greedy(32), &mut strategy, None, |_| Ok(()))?;
//! println!("{} ({:?})", out.generation.text, out.report.speculative.map(|s| s.acceptance_rate));
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod bench;
pub mod chat;
pub mod inspect;
pub mod trace;

use candle_core::Tensor;
use dynexec_core::sampling::Sampler;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::trace::Trace;
use dynexec_core::{Error, Result};
use dynexec_exit::token_exit::{ExitAdapters, TokenExit, TokenExitPolicy};
use dynexec_models::generation::{
    check_prompt, generate, generate_with_step, GenerateOptions, Generation,
};
use dynexec_models::kv_cache::KvCache;
use dynexec_models::llama::Llama;
use dynexec_spec::batch::draft_together;
use dynexec_spec::drafter::Drafter;
use dynexec_spec::engine::{generate_speculative, SpecStats, SpeculativeSequence};
use dynexec_spec::lookahead::Lookahead;
use serde::Serialize;

/// How a sequence computes its next tokens.
pub enum Strategy<'a> {
    /// One full-depth forward per token.
    Plain,
    /// Each decoded token leaves at the first exit `policy` trusts; the prompt runs at full
    /// depth.
    EarlyExit {
        /// The exits (one adapter per exit layer) the model was given.
        adapters: &'a ExitAdapters,
        /// When a token may leave.
        policy: TokenExitPolicy,
    },
    /// `drafter` proposes, the target verifies them in one forward; output is the target's.
    Speculative {
        /// What proposes tokens.
        drafter: Box<dyn Drafter + 'a>,
        /// How many tokens to propose per step.
        lookahead: Box<dyn Lookahead + 'a>,
    },
}

/// What speculation did for one sequence.
#[derive(Debug, Clone, Serialize)]
pub struct SpeculativeReport {
    /// The drafter's name (its spec).
    pub draft: String,
    /// The lookahead controller's name.
    pub lookahead: String,
    /// Draft tokens proposed.
    pub proposed: usize,
    /// Draft tokens the target accepted.
    pub accepted: usize,
    /// `accepted / proposed`.
    pub acceptance_rate: f64,
    /// Drafts accepted per verification step.
    pub mean_accepted_length: f64,
    /// Forward passes of the draft (0 for model-free drafters).
    pub draft_forwards: usize,
    /// Forward passes of the target, the prefill included.
    pub target_forwards: usize,
    /// Seconds spent drafting.
    pub draft_secs: f64,
    /// Seconds spent verifying.
    pub verify_secs: f64,
}

impl From<&SpecStats> for SpeculativeReport {
    fn from(s: &SpecStats) -> Self {
        Self {
            draft: s.draft.clone(),
            lookahead: s.lookahead.clone(),
            proposed: s.proposed,
            accepted: s.accepted,
            acceptance_rate: s.acceptance_rate(),
            mean_accepted_length: s.mean_accepted_length(),
            draft_forwards: s.draft_forwards,
            target_forwards: s.target_forwards,
            draft_secs: s.draft_secs,
            verify_secs: s.verify_secs,
        }
    }
}

/// What per-token early exit did for one sequence.
#[derive(Debug, Clone, Serialize)]
pub struct EarlyExitReport {
    /// The policy, as `confidence:T`, `saturation:T` or `classifier:T`.
    pub policy: String,
    /// Mean of [`Self::exit_layers`] (0 with none).
    pub mean_exit_layer: f64,
    /// The model's depth.
    pub layers_total: usize,
    /// The layer each decoded token left at (the first token comes from the full-depth
    /// prefill).
    pub exit_layers: Vec<usize>,
}

impl EarlyExitReport {
    fn new(exit: &TokenExit<'_>) -> Self {
        Self {
            policy: exit.policy.to_string(),
            mean_exit_layer: mean(&exit.exit_layers),
            layers_total: exit.model.num_layers(),
            exit_layers: exit.exit_layers.clone(),
        }
    }
}

/// Mean of layer counts (0 for none).
pub fn mean(values: &[usize]) -> f64 {
    values.iter().sum::<usize>() as f64 / values.len().max(1) as f64
}

/// What a strategy did: empty for plain decoding.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DecodeReport {
    /// Present for speculative decoding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speculative: Option<SpeculativeReport>,
    /// Present for per-token early exit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_exit: Option<EarlyExitReport>,
}

/// A finished generation and what its strategy did.
pub struct Decoded {
    /// Tokens, text, why it stopped and its speed.
    pub generation: Generation,
    /// What the strategy did.
    pub report: DecodeReport,
}

/// Generates from `prompt_ids` with `strategy`, calling `on_text` with each complete piece of
/// text. Greedy output is the same under every strategy but early exit (which trades it for
/// speed); `trace` taps layers during plain decoding only.
pub fn decode(
    model: &Llama,
    tokenizer: &TextTokenizer,
    prompt_ids: &[u32],
    options: &GenerateOptions,
    strategy: &mut Strategy<'_>,
    trace: Option<&mut Trace>,
    on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Decoded> {
    if trace.is_some() && !matches!(strategy, Strategy::Plain) {
        return Err(Error::InvalidArgument(
            "a trace needs plain decoding: run it without a draft or early exit (greedy output is the same)".into(),
        ));
    }
    match strategy {
        Strategy::Plain => Ok(Decoded {
            generation: generate(model, tokenizer, prompt_ids, options, trace, on_text)?,
            report: DecodeReport::default(),
        }),
        Strategy::EarlyExit { adapters, policy } => {
            let mut exit = TokenExit::new(model, adapters, *policy)?;
            let generation = generate_with_step(
                model,
                tokenizer,
                prompt_ids,
                options,
                None,
                |ids, cache, _| exit.step(ids, cache),
                on_text,
            )?;
            Ok(Decoded {
                generation,
                report: DecodeReport {
                    early_exit: Some(EarlyExitReport::new(&exit)),
                    ..Default::default()
                },
            })
        }
        Strategy::Speculative { drafter, lookahead } => {
            let out = generate_speculative(
                model,
                drafter.as_mut(),
                lookahead.as_mut(),
                tokenizer,
                prompt_ids,
                options,
                on_text,
            )?;
            Ok(Decoded {
                generation: out.generation,
                report: DecodeReport {
                    speculative: Some(SpeculativeReport::from(&out.spec)),
                    ..Default::default()
                },
            })
        }
    }
}

/// One sequence's part in a shared step: the sequence, the prompt and tokens so far, and
/// the most tokens it may draft.
pub struct BatchMember<'a, 'm> {
    /// The sequence.
    pub sequence: &'a mut Sequence<'m>,
    /// The prompt and the tokens so far (its last token is not yet in the cache).
    pub history: &'a [u32],
    /// The most tokens a speculative sequence may draft (a verification adds one more).
    pub max_drafts: usize,
}

/// The rows each sequence's next step runs through the target in a forward shared by all
/// ([`Llama::forward_segments`] on [`Sequence::batch_cache`]): a plain sequence's last
/// token; a speculative one's last token and its drafts, drafted together where sequences
/// share a draft model ([`draft_together`]), and none unless `speculate` (one token then,
/// decoded plainly: still lossless). `None` for sequences that step themselves (early
/// exit). [`Sequence::take_rows`] takes each sequence's logits.
pub fn batch_rows(
    members: &mut [BatchMember<'_, '_>],
    speculate: bool,
) -> Vec<Result<Option<Vec<u32>>>> {
    let mut out: Vec<Option<Result<Option<Vec<u32>>>>> = (0..members.len()).map(|_| None).collect();
    let mut speculative = Vec::new();
    let mut budgets = Vec::new();
    let mut slots = Vec::new();
    for (i, member) in members.iter_mut().enumerate() {
        match &mut member.sequence.stepper {
            Stepper::Plain { .. } => {
                out[i] = Some(match member.history.last() {
                    Some(&last) => Ok(Some(vec![last])),
                    None => Err(Error::InvalidArgument(
                        "a sequence steps after at least one token".into(),
                    )),
                });
            }
            Stepper::EarlyExit { .. } => out[i] = Some(Ok(None)),
            Stepper::Speculative(spec) => {
                speculative.push(&mut **spec);
                budgets.push(if speculate { member.max_drafts } else { 0 });
                slots.push(i);
            }
        }
    }
    for (slot, rows) in slots
        .into_iter()
        .zip(draft_together(&mut speculative, &budgets))
    {
        out[slot] = Some(rows.map(Some));
    }
    out.into_iter()
        .map(|o| {
            o.unwrap_or_else(|| Err(Error::InvalidArgument("a sequence was not prepared".into())))
        })
        .collect()
}

/// The KV cache a finished plain sequence leaves, with the tokens whose keys and values it
/// holds: the next request that starts with the same tokens (the next turn of a chat, a shared
/// system prompt) skips prefilling them ([`Sequence::resume`]), as llama-server's
/// `cache_prompt` and vLLM's prefix caching do. Only plain sequences leave one: early exit
/// fills skipped layers with approximations, and a speculative sequence's draft cache would
/// need its own bookkeeping.
pub struct CachedPrefix {
    cache: KvCache,
    tokens: Vec<u32>,
}

impl CachedPrefix {
    /// The tokens whose keys and values the cache holds.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// How many of `prompt`'s first tokens can come from this cache: their common prefix,
    /// less one when it is the whole prompt (the last prompt token's logits give the first
    /// new token, so it is always computed).
    pub fn reusable(&self, prompt: &[u32]) -> usize {
        let common = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        common.min(prompt.len().saturating_sub(1))
    }
}

/// How one [`Sequence`] steps.
enum Stepper<'m> {
    Plain {
        cache: KvCache,
        sampler: Sampler,
    },
    EarlyExit {
        cache: KvCache,
        sampler: Sampler,
        exit: TokenExit<'m>,
    },
    Speculative(Box<SpeculativeSequence<'m>>),
}

/// One sequence decoded a step at a time with its strategy. Plain and speculative sequences
/// can share a target forward ([`batch_rows`], [`Self::batch_cache`], [`Self::take_rows`]);
/// early-exit ones step themselves ([`Self::step`]).
pub struct Sequence<'m> {
    model: &'m Llama,
    stepper: Stepper<'m>,
}

impl<'m> Sequence<'m> {
    /// Prefills `prompt_ids` with `strategy` and samples the first token.
    pub fn start(
        model: &'m Llama,
        strategy: Strategy<'m>,
        prompt_ids: &[u32],
        options: &GenerateOptions,
    ) -> Result<(Self, u32)> {
        let mut sequence = Self::new(model, strategy, prompt_ids, options)?;
        // A prompt runs at full depth whatever the strategy.
        let logits = model.forward_last(prompt_ids, sequence.prompt_cache(), None)?;
        let first = sequence.begin(&logits, prompt_ids)?;
        Ok((sequence, first))
    }

    /// A sequence for `prompt_ids` with nothing computed yet. The caller prefills the prompt
    /// at full depth on [`Self::prompt_cache`], in pieces if it likes (a server shares each
    /// piece's forward with other sequences' rows: chunked prefill), then hands the last
    /// position's logits to [`Self::begin`].
    pub fn new(
        model: &'m Llama,
        strategy: Strategy<'m>,
        prompt_ids: &[u32],
        options: &GenerateOptions,
    ) -> Result<Self> {
        check_prompt(model, prompt_ids, options)?;
        let sampler = || Sampler::for_prompt(options.sampling.clone(), prompt_ids.len());
        let stepper = match strategy {
            Strategy::Speculative { drafter, lookahead } => Stepper::Speculative(Box::new(
                SpeculativeSequence::new(model, drafter, lookahead, prompt_ids, options)?,
            )),
            Strategy::EarlyExit { adapters, policy } => Stepper::EarlyExit {
                exit: TokenExit::new(model, adapters, policy)?,
                cache: model.new_cache(),
                sampler: sampler()?,
            },
            Strategy::Plain => Stepper::Plain {
                cache: model.new_cache(),
                sampler: sampler()?,
            },
        };
        Ok(Self { model, stepper })
    }

    /// A plain sequence for `prompt_ids` whose first tokens come from `prefix`'s cache:
    /// it is cut back to what the prompt shares with it ([`CachedPrefix::reusable`]), and the
    /// caller prefills only `prompt_ids[reused..]` on [`Self::prompt_cache`]. Returns the
    /// sequence and `reused`. The reused keys and values were computed by the same layers,
    /// partly a row at a time where a cold prefill computes them together, so they agree up
    /// to rounding; with kernels whose rows do not depend on the batch (dynexec's CPU
    /// kernels) they are the same bits, and the tests check that answers are identical.
    pub fn resume(
        model: &'m Llama,
        prompt_ids: &[u32],
        options: &GenerateOptions,
        prefix: CachedPrefix,
    ) -> Result<(Self, usize)> {
        check_prompt(model, prompt_ids, options)?;
        let reused = prefix.reusable(prompt_ids);
        let mut cache = prefix.cache;
        cache.truncate(reused)?;
        let stepper = Stepper::Plain {
            cache,
            sampler: Sampler::for_prompt(options.sampling.clone(), prompt_ids.len())?,
        };
        Ok((Self { model, stepper }, reused))
    }

    /// The cache a finished plain sequence leaves for the next request, given `history`, the
    /// prompt and the tokens generated (whose last one is not in the cache yet); `None` for
    /// other strategies, or when the cache does not match the history.
    pub fn into_prefix(self, history: &[u32]) -> Option<CachedPrefix> {
        match self.stepper {
            Stepper::Plain { cache, .. } if cache.len() <= history.len() => {
                let tokens = history[..cache.len()].to_vec();
                Some(CachedPrefix { cache, tokens })
            }
            _ => None,
        }
    }

    /// The target's cache, where the prompt is prefilled ([`Self::new`]).
    pub fn prompt_cache(&mut self) -> &mut KvCache {
        match &mut self.stepper {
            Stepper::Plain { cache, .. } | Stepper::EarlyExit { cache, .. } => cache,
            Stepper::Speculative(spec) => spec.cache_mut(),
        }
    }

    /// After a piece of the prompt was prefilled: a speculative sequence's draft model reads
    /// the first `len` prompt tokens too, so its prefill also comes in pieces.
    pub fn prefill_draft(&mut self, len: usize) -> Result<()> {
        match &mut self.stepper {
            Stepper::Speculative(spec) => spec.prefill_draft(len),
            _ => Ok(()),
        }
    }

    /// The first token, from the logits `(vocab,)` of the prompt's last position once the
    /// whole prompt is in [`Self::prompt_cache`].
    pub fn begin(&mut self, logits: &Tensor, prompt_ids: &[u32]) -> Result<u32> {
        match &mut self.stepper {
            Stepper::Plain { sampler, .. } | Stepper::EarlyExit { sampler, .. } => {
                sampler.sample(logits, prompt_ids)
            }
            Stepper::Speculative(spec) => spec.begin(logits),
        }
    }

    /// The cache a shared forward runs this sequence's rows on ([`batch_rows`]); `None` for
    /// sequences that step themselves (early exit).
    pub fn batch_cache(&mut self) -> Option<&mut KvCache> {
        match &mut self.stepper {
            Stepper::Plain { cache, .. } => Some(cache),
            Stepper::Speculative(spec) => Some(spec.cache_mut()),
            Stepper::EarlyExit { .. } => None,
        }
    }

    /// The next tokens from the logits of [`batch_rows`]'s rows `(rows, vocab)`: a
    /// plain sequence samples its token, a speculative one verifies its drafts. `history` is
    /// the prompt and the tokens so far (for the repetition penalty).
    pub fn take_rows(&mut self, logits: &Tensor, history: &[u32]) -> Result<Vec<u32>> {
        match &mut self.stepper {
            Stepper::Plain { sampler, .. } => {
                let last = logits.get(logits.dim(0)? - 1)?;
                Ok(vec![sampler.sample(&last, history)?])
            }
            Stepper::Speculative(spec) => spec.verify(logits),
            Stepper::EarlyExit { .. } => Err(Error::InvalidArgument(
                "an early-exit sequence steps itself, not in a batched forward".into(),
            )),
        }
    }

    /// Speculative steps that drafted, draft tokens proposed and accepted so far (zeros for
    /// other strategies).
    pub fn draft_counts(&self) -> (usize, usize, usize) {
        match &self.stepper {
            Stepper::Speculative(spec) => (spec.spec.steps, spec.spec.proposed, spec.spec.accepted),
            _ => (0, 0, 0),
        }
    }

    /// Whether this sequence decodes speculatively.
    pub fn is_speculative(&self) -> bool {
        matches!(self.stepper, Stepper::Speculative(_))
    }

    /// Computes the next tokens after `history` (the prompt and the tokens so far; its last
    /// token is not yet in the cache): one token, or a speculative step's accepted drafts and
    /// the target's own token, drafting at most `max_drafts`.
    pub fn step(&mut self, history: &[u32], max_drafts: usize) -> Result<Vec<u32>> {
        let last = *history.last().ok_or_else(|| {
            Error::InvalidArgument("a sequence steps after at least one token".into())
        })?;
        match &mut self.stepper {
            Stepper::Plain { cache, sampler } => {
                let logits = self.model.forward_last(&[last], cache, None)?;
                Ok(vec![sampler.sample(&logits, history)?])
            }
            Stepper::EarlyExit {
                cache,
                sampler,
                exit,
            } => {
                let logits = exit.step(&[last], cache)?;
                Ok(vec![sampler.sample(&logits, history)?])
            }
            Stepper::Speculative(spec) => spec.step(max_drafts),
        }
    }

    /// What the strategy has done so far.
    pub fn report(&self) -> DecodeReport {
        match &self.stepper {
            Stepper::Plain { .. } => DecodeReport::default(),
            Stepper::EarlyExit { exit, .. } => DecodeReport {
                early_exit: Some(EarlyExitReport::new(exit)),
                ..Default::default()
            },
            Stepper::Speculative(spec) => DecodeReport {
                speculative: Some(SpeculativeReport::from(&spec.spec)),
                ..Default::default()
            },
        }
    }
}
