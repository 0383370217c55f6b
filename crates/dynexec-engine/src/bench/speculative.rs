//! The speculative-decoding benchmark: plain greedy decoding of a target against every
//! drafter × lookahead controller on the same prompts, with speed, acceptance and whether the
//! output stayed identical (it must: speculation is lossless).

use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::Result;
use dynexec_models::generation::{generate, GenerateOptions};
use dynexec_models::llama::Llama;
use dynexec_spec::drafter::Drafter;
use dynexec_spec::engine::generate_speculative;
use serde::Serialize;
use std::time::Instant;

/// A named set of prompts, already tokenized.
pub struct PromptSet {
    /// The set's name in the rows.
    pub name: &'static str,
    /// The prompts' token ids.
    pub prompts: Vec<Vec<u32>>,
}

/// HumanEval's fixed split: problems before this index train and tune (DISCO, settings),
/// the rest give every reported figure.
pub const HUMANEVAL_TEST_START: usize = 82;

impl PromptSet {
    /// Each text encoded as given (code completion: no chat template).
    pub fn raw(name: &'static str, texts: &[String], tokenizer: &TextTokenizer) -> Result<Self> {
        let prompts = texts
            .iter()
            .map(|text| tokenizer.encode(text))
            .collect::<Result<_>>()?;
        Ok(Self { name, prompts })
    }

    /// Each text as a user turn in the model's chat template.
    pub fn chat(name: &'static str, texts: &[String], tokenizer: &TextTokenizer) -> Result<Self> {
        let prompts = texts
            .iter()
            .map(|text| tokenizer.encode(&tokenizer.chat_prompt(None, text)?))
            .collect::<Result<_>>()?;
        Ok(Self { name, prompts })
    }
}

/// One prompt set decoded one way.
#[derive(Debug, Clone, Serialize)]
pub struct SpeculativeRow {
    /// The prompt set.
    pub prompts: &'static str,
    /// The target's weight format (`auto`: as stored where a fast kernel takes it).
    pub target_quant: String,
    /// The drafter (`none` for plain decoding).
    pub draft: String,
    /// The lookahead controller (`-` for plain decoding).
    pub lookahead: String,
    /// Generated tokens per second after the prompt's forward pass.
    pub tokens_per_s: f64,
    /// Over plain decoding of the same prompts.
    pub speedup: f64,
    /// Accepted over proposed draft tokens.
    pub acceptance_rate: f64,
    /// Drafts accepted per verification step.
    pub mean_accepted_length: f64,
    /// Whether every prompt's tokens equal plain decoding's.
    pub identical_to_plain: bool,
}

/// A drafter under test and its name.
pub struct NamedDrafter {
    /// As the user wrote it.
    pub name: String,
    /// The drafter.
    pub drafter: Box<dyn Drafter>,
}

/// Decodes `set` plainly, then with every drafter × lookahead (one controller per set, so
/// online tuning carries across prompts); `on_generation` hears each finished generation's
/// configuration. The first row is plain decoding.
#[allow(clippy::too_many_arguments)]
pub fn bench_prompt_set(
    model: &Llama,
    tokenizer: &TextTokenizer,
    target_quant: &str,
    set: &PromptSet,
    drafters: &mut [NamedDrafter],
    lookaheads: &[String],
    options: &GenerateOptions,
    mut on_generation: impl FnMut(&str),
) -> Result<Vec<SpeculativeRow>> {
    // Plain decoding of the same target: the baseline and the reference output.
    let (mut plain_tokens, mut plain_secs, mut plain_ids) = (0usize, 0f64, Vec::new());
    for prompt in &set.prompts {
        let start = Instant::now();
        let out = generate(model, tokenizer, prompt, options, None, |_| Ok(()))?;
        // The prompt's forward is the same with or without a draft: time the rest.
        plain_secs += start.elapsed().as_secs_f64() - out.stats.prefill_secs;
        plain_tokens += out.token_ids.len();
        plain_ids.push(out.token_ids);
        on_generation("plain");
    }
    let plain_rate = plain_tokens as f64 / plain_secs;
    let mut rows = vec![SpeculativeRow {
        prompts: set.name,
        target_quant: target_quant.to_string(),
        draft: "none".to_string(),
        lookahead: "-".to_string(),
        tokens_per_s: plain_rate,
        speedup: 1.0,
        acceptance_rate: 0.0,
        mean_accepted_length: 0.0,
        identical_to_plain: true,
    }];
    for NamedDrafter { name, drafter } in drafters.iter_mut() {
        for lookahead_spec in lookaheads {
            let label = format!("{name} / {lookahead_spec}");
            let mut lookahead = dynexec_spec::lookahead::parse(lookahead_spec)?;
            let (mut tokens, mut secs, mut proposed, mut accepted, mut steps) =
                (0usize, 0f64, 0usize, 0usize, 0usize);
            let mut identical = true;
            for (prompt, reference) in set.prompts.iter().zip(&plain_ids) {
                drafter.rollback(0)?;
                let start = Instant::now();
                let out = generate_speculative(
                    model,
                    drafter.as_mut(),
                    lookahead.as_mut(),
                    tokenizer,
                    prompt,
                    options,
                    |_| Ok(()),
                )?;
                secs += start.elapsed().as_secs_f64() - out.generation.stats.prefill_secs;
                tokens += out.generation.token_ids.len();
                identical &= &out.generation.token_ids == reference;
                proposed += out.spec.proposed;
                accepted += out.spec.accepted;
                steps += out.spec.steps;
                on_generation(&label);
            }
            let rate = tokens as f64 / secs;
            rows.push(SpeculativeRow {
                prompts: set.name,
                target_quant: target_quant.to_string(),
                draft: name.clone(),
                lookahead: lookahead.name(),
                tokens_per_s: rate,
                speedup: rate / plain_rate,
                acceptance_rate: accepted as f64 / proposed.max(1) as f64,
                mean_accepted_length: accepted as f64 / steps.max(1) as f64,
                identical_to_plain: identical,
            });
        }
    }
    Ok(rows)
}
