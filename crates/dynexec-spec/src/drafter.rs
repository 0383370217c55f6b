//! Drafters: a small model, the target's own quantized copy or first layers, or n-grams of
//! the prompt and the text so far.

use crate::lookahead::{DraftSignal, Lookahead};
use candle_core::{DType, Tensor};
use dynexec_core::sampling::Sampler;
use dynexec_core::Result;
use dynexec_models::kv_cache::KvCache;
use dynexec_models::llama::{Llama, VocabSubset};
use std::sync::Arc;

/// Tokens proposed for one step.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    /// The proposed tokens, in order; may be empty.
    pub tokens: Vec<u32>,
    /// The draft's distribution for each token (rejection sampling needs it); `None` when the
    /// proposal is deterministic or decoding is greedy.
    pub distributions: Vec<Option<Vec<f32>>>,
    /// What the draft knew when it proposed each token (certain for deterministic drafters).
    pub signals: Vec<DraftSignal>,
}

/// Proposes continuations of a sequence.
pub trait Drafter {
    /// How reports name this drafter (a model's name, or e.g. `ngram:3,10`).
    fn name(&self) -> String;
    /// Proposes up to `max` tokens after `tokens`. With a `sampler` the tokens are sampled
    /// from the draft's distributions (as the target will be); without, they are greedy.
    fn propose(
        &mut self,
        tokens: &[u32],
        max: usize,
        sampler: Option<&mut Sampler>,
        lookahead: &dyn Lookahead,
    ) -> Result<Draft>;
    /// The sequence was rewritten from position `len` on: forget any state past it.
    fn rollback(&mut self, len: usize) -> Result<()>;
    /// Reads `tokens` (a prefix of the prompt) ahead of the first proposal, so that a long
    /// prompt is taken in pieces; proposing works the same without it. Nothing by default.
    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        let _ = tokens;
        Ok(())
    }
    /// Forward passes run so far (0 for model-free drafters).
    fn forwards(&self) -> usize;
    /// The same drafter with no sequence state, for another sequence (weights are shared).
    fn fresh(&self) -> Box<dyn Drafter>;
    /// The draft model, where this drafter is one whose steps can share a forward with
    /// other sequences' ([`crate::batch::draft_together`]); `None` otherwise.
    fn as_batchable(&mut self) -> Option<&mut ModelDrafter> {
        None
    }
}

/// A borrowed drafter drafts like the one it borrows (so a sequence can own either).
impl<T: Drafter + ?Sized> Drafter for &mut T {
    fn name(&self) -> String {
        (**self).name()
    }
    fn propose(
        &mut self,
        tokens: &[u32],
        max: usize,
        sampler: Option<&mut Sampler>,
        lookahead: &dyn Lookahead,
    ) -> Result<Draft> {
        (**self).propose(tokens, max, sampler, lookahead)
    }
    fn rollback(&mut self, len: usize) -> Result<()> {
        (**self).rollback(len)
    }
    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        (**self).prefill(tokens)
    }
    fn forwards(&self) -> usize {
        (**self).forwards()
    }
    fn fresh(&self) -> Box<dyn Drafter> {
        (**self).fresh()
    }
    fn as_batchable(&mut self) -> Option<&mut ModelDrafter> {
        (**self).as_batchable()
    }
}

/// A llama-family draft model: a separate small model, the target's quantized copy, or the
/// target's first `depth` layers with its head (layer-skip self-drafting).
pub struct ModelDrafter {
    model: Llama,
    depth: usize,
    cache: KvCache,
    name: String,
    forwards: usize,
    /// Maps the hidden state at `depth` into the head's input (an early-exit adapter).
    exit_adapter: Option<ExitAdapterFn>,
    /// Proposes only these tokens, through a head over their rows (FR-Spec).
    vocab: Option<Arc<VocabSubset>>,
}

/// A map from a layer's hidden state `(1, 1, hidden)` to what the final norm and head expect.
pub type ExitAdapterFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// A draft model must score the same vocabulary as the target: its ids mean the same tokens.
pub fn check_vocab(target: &Llama, draft: &Llama) -> Result<()> {
    let (t, d) = (target.vocab_size(), draft.vocab_size());
    if t != d {
        return Err(dynexec_core::Error::InvalidArgument(format!(
            "the draft model's vocabulary has {d} tokens but the target's has {t}: a draft must share the target's tokenizer"
        )));
    }
    Ok(())
}

impl ModelDrafter {
    /// Drafts with every layer of `model`.
    pub fn new(model: Llama, name: impl Into<String>) -> Self {
        let depth = model.num_layers();
        Self::with_depth(model, depth, name)
    }

    /// Drafts with the first `depth` layers of `model`, then its final norm and head.
    pub fn with_depth(model: Llama, depth: usize, name: impl Into<String>) -> Self {
        let cache = model.new_cache();
        Self {
            depth: depth.clamp(1, model.num_layers()),
            model,
            cache,
            name: name.into(),
            forwards: 0,
            exit_adapter: None,
            vocab: None,
        }
    }

    /// Proposes only the tokens `ids` (FR-Spec: the most frequent ones), scoring them with
    /// their rows of the head alone; the target still verifies over its full vocabulary.
    pub fn with_vocab_subset(mut self, ids: &[u32]) -> Result<Self> {
        let subset = self.model.vocab_subset(ids)?;
        self.name = format!("{}/vocab:{}", self.name, ids.len());
        self.vocab = Some(Arc::new(subset));
        Ok(self)
    }

    /// The token id of position `index` of the draft's logits.
    fn token_at(&self, index: u32) -> u32 {
        match &self.vocab {
            Some(subset) => subset.ids()[index as usize],
            None => index,
        }
    }

    /// Passes the hidden state at the draft depth through `adapter` before the head (the
    /// early-exit adapters trained for that layer make better layer-skip drafts).
    pub fn with_exit_adapter(mut self, adapter: ExitAdapterFn) -> Self {
        self.exit_adapter = Some(adapter);
        self
    }

    fn logits(&mut self, ids: &[u32]) -> Result<Tensor> {
        self.forwards += 1;
        let hidden = self
            .model
            .last_hidden_at_depth(ids, &mut self.cache, self.depth)?;
        self.head_logits(&hidden)
    }

    /// The head's logits `(vocab or subset,)` for a hidden state `(1, 1, hidden)` at the
    /// draft depth (through the exit adapter, if any).
    pub(crate) fn head_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let adapted;
        let hidden = match &self.exit_adapter {
            Some(adapt) => {
                adapted = adapt(hidden)?;
                &adapted
            }
            None => hidden,
        };
        let logits = match &self.vocab {
            Some(subset) => self.model.head_over(hidden, subset)?,
            None => self.model.head(hidden)?,
        };
        Ok(logits.flatten_all()?)
    }

    /// The tokens of `tokens` its cache lacks (at least the last one), after rolling the
    /// cache back to the prefix it shares with them.
    pub(crate) fn catch_up<'t>(&mut self, tokens: &'t [u32]) -> Result<&'t [u32]> {
        let cached = self.cache.len().min(tokens.len().saturating_sub(1));
        self.cache.truncate(cached)?;
        Ok(&tokens[cached..])
    }

    /// The token to propose at `position` from the draft's logits, its signal, and (when
    /// sampling) the draft's distribution over the whole vocabulary.
    pub(crate) fn choose(
        &self,
        logits: &Tensor,
        position: usize,
        sampler: Option<&mut Sampler>,
    ) -> Result<(u32, DraftSignal, Option<Vec<f32>>)> {
        let row: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        Ok(match sampler {
            Some(s) => {
                let q = s.distribution(&row);
                let index = s.draw_from(&q) as usize;
                let signal = DraftSignal::from_probs(position, &q, index);
                // Verification compares distributions over the whole vocabulary.
                let q = match &self.vocab {
                    Some(subset) => {
                        let mut full = vec![0.0; self.model.vocab_size()];
                        for (&id, &p) in subset.ids().iter().zip(&q) {
                            full[id as usize] = p;
                        }
                        full
                    }
                    None => q,
                };
                (self.token_at(index as u32), signal, Some(q))
            }
            None => {
                let (index, signal) = DraftSignal::of_argmax(position, &row);
                (self.token_at(index as u32), signal, None)
            }
        })
    }

    /// Whether this drafter runs the whole model with its own head (what
    /// [`crate::batch::draft_together`] batches); the name tells models apart.
    fn whole_model(&self) -> bool {
        self.depth == self.model.num_layers() && self.exit_adapter.is_none()
    }

    /// The draft model, its cache and its name, for a forward shared with others.
    pub(crate) fn parts(&mut self) -> (&Llama, &mut KvCache, &str) {
        (&self.model, &mut self.cache, &self.name)
    }

    /// Counts a forward this drafter took part in.
    pub(crate) fn count_forward(&mut self) {
        self.forwards += 1;
    }
}

impl Drafter for ModelDrafter {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn propose(
        &mut self,
        tokens: &[u32],
        max: usize,
        mut sampler: Option<&mut Sampler>,
        lookahead: &dyn Lookahead,
    ) -> Result<Draft> {
        let mut draft = Draft::default();
        if max == 0 || tokens.is_empty() {
            return Ok(draft);
        }
        let feed = self.catch_up(tokens)?;
        let mut logits = self.logits(feed)?;
        loop {
            let position = draft.tokens.len() + 1;
            let (token, signal, distribution) =
                self.choose(&logits, position, sampler.as_deref_mut())?;
            draft.tokens.push(token);
            draft.signals.push(signal);
            draft.distributions.push(distribution);
            if draft.tokens.len() >= max || !lookahead.keep_drafting(&signal) {
                return Ok(draft);
            }
            logits = self.logits(&[token])?;
        }
    }

    fn rollback(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len)
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        let cached = self.cache.len().min(tokens.len());
        self.cache.truncate(cached)?;
        if cached < tokens.len() {
            // The layers up to the draft depth fill the cache; no head is needed.
            self.forwards += 1;
            self.model
                .last_hidden_at_depth(&tokens[cached..], &mut self.cache, self.depth)?;
        }
        Ok(())
    }

    fn forwards(&self) -> usize {
        self.forwards
    }

    fn fresh(&self) -> Box<dyn Drafter> {
        Box::new(Self {
            model: self.model.clone(),
            depth: self.depth,
            cache: self.model.new_cache(),
            name: self.name.clone(),
            forwards: 0,
            exit_adapter: self.exit_adapter.clone(),
            vocab: self.vocab.clone(),
        })
    }

    fn as_batchable(&mut self) -> Option<&mut ModelDrafter> {
        self.whole_model().then_some(self)
    }
}

/// Prompt lookup: find the longest recent n-gram (up to `max_ngram`) that occurred earlier
/// in the sequence and propose what followed it (up to `max_tokens`). No model, no cost.
pub struct NgramDrafter {
    /// Longest suffix it tries to match, at least 1.
    pub max_ngram: usize,
    /// Most tokens it proposes per step, at least 1.
    pub max_tokens: usize,
}

impl NgramDrafter {
    /// A drafter with these limits (each raised to at least 1).
    pub fn new(max_ngram: usize, max_tokens: usize) -> Self {
        Self {
            max_ngram: max_ngram.max(1),
            max_tokens: max_tokens.max(1),
        }
    }

    /// The continuation of the latest earlier match of the longest matching suffix.
    pub fn lookup(&self, tokens: &[u32], max: usize) -> Vec<u32> {
        let len = tokens.len();
        for n in (1..=self.max_ngram.min(len.saturating_sub(1))).rev() {
            let suffix = &tokens[len - n..];
            // Latest start j < len - n whose n tokens equal the suffix.
            if let Some(j) = (0..len - n).rev().find(|&j| &tokens[j..j + n] == suffix) {
                let from = j + n;
                let to = (from + max.min(self.max_tokens)).min(len);
                if from < to {
                    return tokens[from..to].to_vec();
                }
            }
        }
        Vec::new()
    }
}

impl Drafter for NgramDrafter {
    fn name(&self) -> String {
        format!("ngram:{},{}", self.max_ngram, self.max_tokens)
    }

    fn propose(
        &mut self,
        tokens: &[u32],
        max: usize,
        _: Option<&mut Sampler>,
        _: &dyn Lookahead,
    ) -> Result<Draft> {
        let tokens = self.lookup(tokens, max);
        Ok(Draft {
            signals: (1..=tokens.len()).map(DraftSignal::certain).collect(),
            distributions: vec![None; tokens.len()],
            tokens,
        })
    }

    fn rollback(&mut self, _: usize) -> Result<()> {
        Ok(())
    }

    fn forwards(&self) -> usize {
        0
    }

    fn fresh(&self) -> Box<dyn Drafter> {
        Box::new(Self::new(self.max_ngram, self.max_tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_lookup_prefers_the_longest_latest_match() {
        let d = NgramDrafter::new(3, 4);
        // "1 2 3" occurred at 0 and 5; the latest earlier match continues with 9 8.
        assert_eq!(
            d.lookup(&[1, 2, 3, 4, 7, 1, 2, 3, 9, 8, 1, 2, 3], 10),
            vec![9, 8, 1, 2]
        );
        // Only a 1-gram matches.
        assert_eq!(d.lookup(&[5, 6, 7, 5], 2), vec![6, 7]);
        assert!(d.lookup(&[1, 2, 3], 4).is_empty());
        assert_eq!(d.lookup(&[4, 4], 3), vec![4]);
    }
}

/// Two drafters in order: the first one's proposal when it has one, the second's otherwise.
/// Prompt lookup first and a draft model when no n-gram matches costs a draft-model forward
/// only where the cheap guess fails. The second drafter's cache catches up on the tokens the
/// first proposed when it next drafts.
pub struct ChainDrafter {
    first: Box<dyn Drafter>,
    then: Box<dyn Drafter>,
}

impl ChainDrafter {
    /// Drafts with `first`, falling back to `then` when `first` proposes nothing.
    pub fn new(first: Box<dyn Drafter>, then: Box<dyn Drafter>) -> Self {
        Self { first, then }
    }
}

impl Drafter for ChainDrafter {
    fn name(&self) -> String {
        format!("{}+{}", self.first.name(), self.then.name())
    }

    fn propose(
        &mut self,
        tokens: &[u32],
        max: usize,
        mut sampler: Option<&mut Sampler>,
        lookahead: &dyn Lookahead,
    ) -> Result<Draft> {
        let draft = self
            .first
            .propose(tokens, max, sampler.as_deref_mut(), lookahead)?;
        if !draft.tokens.is_empty() {
            return Ok(draft);
        }
        self.then.propose(tokens, max, sampler, lookahead)
    }

    fn rollback(&mut self, len: usize) -> Result<()> {
        self.first.rollback(len)?;
        self.then.rollback(len)
    }

    fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        self.first.prefill(tokens)?;
        self.then.prefill(tokens)
    }

    fn forwards(&self) -> usize {
        self.first.forwards() + self.then.forwards()
    }

    fn fresh(&self) -> Box<dyn Drafter> {
        Box::new(Self::new(self.first.fresh(), self.then.fresh()))
    }
}
