//! The speculative-decoding benchmark: plain greedy decoding of a target against every
//! drafter × lookahead controller on the same prompts, with speed, acceptance and whether the
//! output stayed identical (it must: speculation is lossless).

use super::llama_cpp::LlamaSpeculative;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::Result;
use dynexec_models::generation::{generate, GenerateOptions};
use dynexec_models::llama::Llama;
use dynexec_spec::drafter::Drafter;
use dynexec_spec::engine::generate_speculative;
use dynexec_spec::lookahead::Lookahead;
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
    /// Who decoded: `dynexec`, or llama.cpp's speculative tool.
    pub engine: String,
    /// The drafter (`none` for plain decoding).
    pub draft: String,
    /// The lookahead controller (`-` for plain decoding).
    pub lookahead: String,
    /// Generated tokens per second after the prompt's forward pass.
    pub tokens_per_s: f64,
    /// Over dynexec's plain decoding of the same prompts.
    pub speedup: f64,
    /// Accepted over proposed draft tokens.
    pub acceptance_rate: f64,
    /// Drafts accepted per verification step.
    pub mean_accepted_length: f64,
    /// Milliseconds per draft-model forward (0 without a draft model; dynexec rows only).
    pub draft_ms_per_forward: f64,
    /// Milliseconds per verification step, rollback included (dynexec rows only).
    pub verify_ms_per_step: f64,
    /// Whether every prompt's tokens equal plain decoding's (llama.cpp rows: not checked,
    /// `null`).
    pub identical_to_plain: Option<bool>,
}

/// A drafter under test and its name.
pub struct NamedDrafter {
    /// As the user wrote it.
    pub name: String,
    /// The drafter.
    pub drafter: Box<dyn Drafter>,
}

/// Totals of one row over the prompts.
#[derive(Default)]
struct Tally {
    tokens: usize,
    secs: f64,
    proposed: usize,
    accepted: usize,
    steps: usize,
    draft_secs: f64,
    draft_forwards: usize,
    verify_secs: f64,
    identical: bool,
}

impl Tally {
    fn row(
        &self,
        set: &PromptSet,
        quant: &str,
        engine: &str,
        draft: String,
        lookahead: String,
        plain_rate: f64,
        identical: Option<bool>,
    ) -> SpeculativeRow {
        let rate = self.tokens as f64 / self.secs;
        SpeculativeRow {
            prompts: set.name,
            target_quant: quant.to_string(),
            engine: engine.to_string(),
            draft,
            lookahead,
            tokens_per_s: rate,
            speedup: rate / plain_rate,
            acceptance_rate: self.accepted as f64 / self.proposed.max(1) as f64,
            // llama.cpp reports no step count: 0 there.
            mean_accepted_length: if self.steps == 0 {
                0.0
            } else {
                self.accepted as f64 / self.steps as f64
            },
            draft_ms_per_forward: 1e3 * self.draft_secs / self.draft_forwards.max(1) as f64,
            verify_ms_per_step: 1e3 * self.verify_secs / self.steps.max(1) as f64,
            identical_to_plain: identical,
        }
    }
}

/// llama.cpp's speculative tool as a contestant, at these maximum draft lengths.
pub struct LlamaSpeculativePeer {
    /// The tool and the GGUF pair.
    pub tool: LlamaSpeculative,
    /// One row per maximum draft length (e.g. the fixed lookaheads' K).
    pub draft_max: Vec<usize>,
}

/// Decodes `set` plainly, with every drafter × lookahead (one controller per row, so online
/// tuning carries across prompts) and with each llama.cpp peer, taking turns prompt by prompt
/// so that load on the machine falls on every row alike; `on_generation` hears each finished
/// generation's row. The first row is plain decoding.
#[allow(clippy::too_many_arguments)]
pub fn bench_prompt_set(
    model: &Llama,
    tokenizer: &TextTokenizer,
    target_quant: &str,
    set: &PromptSet,
    drafters: &mut [NamedDrafter],
    lookaheads: &[String],
    llama_cpp: &[LlamaSpeculativePeer],
    options: &GenerateOptions,
    mut on_generation: impl FnMut(&str),
) -> Result<Vec<SpeculativeRow>> {
    // (drafter, lookahead spec, controller) rows; a controller trained for another pair
    // (DISCO) skips that drafter rather than failing the run.
    let mut pairs: Vec<(usize, &String, Box<dyn Lookahead>)> = Vec::new();
    for (d, named) in drafters.iter().enumerate() {
        for spec in lookaheads {
            let controller = dynexec_spec::lookahead::parse(spec)?;
            match controller.check_pair(model, &named.drafter.name()) {
                Ok(()) => pairs.push((d, spec, controller)),
                Err(e) => eprintln!("bench speculative: skipping {} / {spec}: {e}", named.name),
            }
        }
    }
    let mut plain = Tally::default();
    let mut tallies: Vec<Tally> = (0..pairs.len())
        .map(|_| Tally {
            identical: true,
            ..Default::default()
        })
        .collect();
    let mut peers: Vec<Tally> = llama_cpp
        .iter()
        .flat_map(|p| p.draft_max.iter())
        .map(|_| Tally::default())
        .collect();
    for prompt in &set.prompts {
        // Plain decoding of the same target: the baseline and the reference output.
        let start = Instant::now();
        let reference = generate(model, tokenizer, prompt, options, None, |_| Ok(()))?;
        // The prompt's forward is the same with or without a draft: time the rest.
        plain.secs += start.elapsed().as_secs_f64() - reference.stats.prefill_secs;
        plain.tokens += reference.token_ids.len();
        on_generation("plain");
        for ((d, spec, lookahead), tally) in pairs.iter_mut().zip(tallies.iter_mut()) {
            let named = &mut drafters[*d];
            named.drafter.rollback(0)?;
            let start = Instant::now();
            let out = generate_speculative(
                model,
                named.drafter.as_mut(),
                lookahead.as_mut(),
                tokenizer,
                prompt,
                options,
                |_| Ok(()),
            )?;
            tally.secs += start.elapsed().as_secs_f64() - out.generation.stats.prefill_secs;
            tally.tokens += out.generation.token_ids.len();
            tally.identical &= out.generation.token_ids == reference.token_ids;
            tally.proposed += out.spec.proposed;
            tally.accepted += out.spec.accepted;
            tally.steps += out.spec.steps;
            tally.draft_secs += out.spec.draft_secs;
            tally.draft_forwards += out.spec.draft_forwards;
            tally.verify_secs += out.spec.verify_secs;
            on_generation(&format!("{} / {spec}", named.name));
        }
        let text = tokenizer.decode(prompt)?;
        let runs = llama_cpp
            .iter()
            .flat_map(|p| p.draft_max.iter().map(move |&k| (p, k)));
        for ((peer, k), tally) in runs.zip(peers.iter_mut()) {
            let run = peer.tool.run(&text, options.max_tokens, k)?;
            tally.tokens += run.tokens;
            tally.secs += run.secs;
            tally.proposed += run.drafted;
            tally.accepted += run.accepted;
            // Its steps are not reported; drafts per step then stay unknown (0).
            on_generation(&format!("llama.cpp / n-max {k}"));
        }
    }
    let plain_rate = plain.tokens as f64 / plain.secs;
    let mut out = vec![plain.row(
        set,
        target_quant,
        "dynexec",
        "none".into(),
        "-".into(),
        plain_rate,
        Some(true),
    )];
    for ((d, _, controller), tally) in pairs.iter().zip(&tallies) {
        out.push(tally.row(
            set,
            target_quant,
            "dynexec",
            drafters[*d].name.clone(),
            controller.name(),
            plain_rate,
            Some(tally.identical),
        ));
    }
    let runs = llama_cpp
        .iter()
        .flat_map(|p| p.draft_max.iter().map(move |&k| (p, k)));
    for ((peer, k), tally) in runs.zip(&peers) {
        let draft = peer
            .tool
            .draft
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        out.push(tally.row(
            set,
            target_quant,
            "llama.cpp",
            draft,
            format!("n-max:{k}"),
            plain_rate,
            None,
        ));
    }
    Ok(out)
}
