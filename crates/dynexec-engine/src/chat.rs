//! A multi-turn conversation that keeps its KV cache between turns, so each turn prefills
//! only what is new: the user's message and whatever the chat template puts around it.
//!
//! Each turn renders the whole conversation with the model's chat template, as a fresh
//! request would, and reuses the longest prefix the cache already holds ([`CachedPrefix`]):
//! the output is the same as a cold run's, only the prefill is shorter. What `dynexec chat`
//! runs.

use crate::{CachedPrefix, Sequence, Strategy};
use dynexec_core::chat_template::ChatMessage;
use dynexec_core::tokenizer::{TextTokenizer, TokenStream};
use dynexec_core::{Error, Result};
use dynexec_models::generation::GenerateOptions;
use dynexec_models::llama::Llama;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Why a turn's answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEnd {
    /// The model ended its turn.
    EndOfTurn,
    /// The answer reached the token budget.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The caller asked it to stop (Ctrl-C).
    Interrupted,
}

/// What one turn cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TurnReport {
    /// Tokens of the rendered conversation the answer continues.
    pub prompt_tokens: usize,
    /// Of those, the tokens whose keys and values came from the previous turns' cache.
    pub reused_tokens: usize,
    /// Of those, the tokens computed this turn (`prompt_tokens - reused_tokens`).
    pub prefilled_tokens: usize,
    /// Tokens in the answer.
    pub generated_tokens: usize,
    /// Seconds to the first answer token (the prefill).
    pub prefill_secs: f64,
    /// Seconds spent on the rest of the answer.
    pub decode_secs: f64,
    /// Why the answer ended.
    pub end: TurnEnd,
}

/// A conversation with one decoder: its turns, and the cache the last turn left.
pub struct ChatSession<'m> {
    model: &'m Llama,
    tokenizer: &'m TextTokenizer,
    system: Option<String>,
    messages: Vec<ChatMessage>,
    prefix: Option<CachedPrefix>,
}

impl<'m> ChatSession<'m> {
    /// An empty conversation, led by `system` when given.
    pub fn new(model: &'m Llama, tokenizer: &'m TextTokenizer, system: Option<String>) -> Self {
        Self {
            model,
            tokenizer,
            system,
            messages: Vec::new(),
            prefix: None,
        }
    }

    /// The turns so far (the system prompt not included).
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Forgets the turns (the cache stays: the system prompt's part is reused).
    pub fn reset(&mut self) {
        self.messages.clear();
    }

    /// Drops the cache the last turn left: the next turn prefills its whole prompt.
    pub fn forget_cache(&mut self) {
        self.prefix = None;
    }

    /// Replaces the system prompt and starts the conversation over.
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system;
        self.reset();
    }

    /// Answers `user`, calling `on_text` with each complete piece of the answer; stops early
    /// once `interrupt` is set. The user's message and the answer (what there is of it)
    /// join the conversation; a message that does not fit the context is refused and left out.
    pub fn turn(
        &mut self,
        user: &str,
        options: &GenerateOptions,
        interrupt: &AtomicBool,
        on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<TurnReport> {
        self.messages.push(ChatMessage::new("user", user));
        let answered = self.answer(options, interrupt, on_text);
        match &answered {
            Ok((_, answer)) => self
                .messages
                .push(ChatMessage::new("assistant", answer.clone())),
            // A turn that failed leaves no trace: no unanswered message, no cache that may
            // hold part of it.
            Err(_) => {
                self.messages.pop();
                self.prefix = None;
            }
        }
        answered.map(|(report, _)| report)
    }

    /// Answers the conversation as it stands (ending with the user's message).
    fn answer(
        &mut self,
        options: &GenerateOptions,
        interrupt: &AtomicBool,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<(TurnReport, String)> {
        let started = Instant::now();
        let prompt = self.render()?;
        let context = self.model.config().context_length;
        if prompt.len() >= context {
            return Err(Error::ContextOverflow {
                prompt_tokens: prompt.len(),
                requested: options.max_tokens,
                context,
            });
        }
        if options.max_tokens == 0 {
            return Err(Error::InvalidArgument(
                "an answer needs a budget of at least one token".into(),
            ));
        }
        let (mut sequence, reused) = match self.prefix.take() {
            Some(prefix) => Sequence::resume(self.model, &prompt, options, prefix)?,
            None => (
                Sequence::new(self.model, Strategy::Plain, &prompt, options)?,
                0,
            ),
        };
        let logits = self
            .model
            .forward_last(&prompt[reused..], sequence.prompt_cache(), None)?;
        let mut token = sequence.begin(&logits, &prompt)?;
        let prefill_secs = started.elapsed().as_secs_f64();
        let mut history = prompt.clone();
        let mut stream = TokenStream::new(self.tokenizer);
        let mut answer = String::new();
        let mut generated = 0;
        let mut emit = |piece: Option<String>, answer: &mut String| -> Result<()> {
            if let Some(piece) = piece {
                answer.push_str(&piece);
                on_text(&piece)?;
            }
            Ok(())
        };
        let end = loop {
            history.push(token);
            if options.stop_at_eos && self.tokenizer.is_eos(token) {
                break TurnEnd::EndOfTurn;
            }
            generated += 1;
            emit(stream.push(token)?, &mut answer)?;
            if generated >= options.max_tokens {
                break TurnEnd::MaxTokens;
            }
            if history.len() >= context {
                break TurnEnd::ContextFull;
            }
            if interrupt.load(Ordering::Relaxed) {
                break TurnEnd::Interrupted;
            }
            token = match sequence.step(&history, 0)?.last() {
                Some(&next) => next,
                None => break TurnEnd::MaxTokens,
            };
        };
        emit(stream.finish()?, &mut answer)?;
        self.prefix = sequence.into_prefix(&history);
        let report = TurnReport {
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            prefilled_tokens: prompt.len() - reused,
            generated_tokens: generated,
            prefill_secs,
            decode_secs: started.elapsed().as_secs_f64() - prefill_secs,
            end,
        };
        Ok((report, answer))
    }

    /// Checks that the conversation can be rendered (the model has a chat template that
    /// takes it), so a front-end can refuse before the first message.
    pub fn check_template(&self) -> Result<()> {
        let mut probe = ChatSession::new(self.model, self.tokenizer, self.system.clone());
        probe.messages.push(ChatMessage::new("user", "Hello."));
        probe.render().map(|_| ())
    }

    /// The conversation as the model reads it, ending where the assistant's turn begins.
    fn render(&self) -> Result<Vec<u32>> {
        let mut messages = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = &self.system {
            messages.push(ChatMessage::new("system", system.clone()));
        }
        messages.extend(self.messages.iter().cloned());
        let text = self.tokenizer.chat_messages(&messages)?;
        self.tokenizer.encode(&text)
    }
}
