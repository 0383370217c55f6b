//! `dynexec generate`: stream a completion and report its speed.

use super::common::{
    build_drafter, default_exit_adapters, load_exit_adapters, resolve_lookahead, DraftBoundsArgs,
    DraftCostArgs, ModelArgs, SamplingArgs,
};
use crate::options::{print_json, GlobalOptions};
use anyhow::{Context, Result};
use clap::Args;
use dynexec_core::device::device_name;
use dynexec_core::trace::Trace;
use dynexec_engine::{decode, EarlyExitReport, SpeculativeReport, Strategy};
use dynexec_exit::token_exit::TokenExitPolicy;
use dynexec_models::generation::{GenerateOptions, StopReason};
use dynexec_models::llama::LoadedDecoder;
use dynexec_spec::draft_spec::DraftSpec;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Examples:\n  dynexec generate --prompt \"The capital of France is\" --max-tokens 32\n  dynexec generate --chat --prompt \"Give me three fruit names.\" --temperature 0.7 --seed 1\n  dynexec generate --json --prompt \"Once upon a time\" | jq .decode_tokens_per_s"
)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The prompt, encoded as given (special-token text such as <|im_start|> is honoured).
    #[arg(long, short, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,

    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,

    /// Wrap the prompt as a user turn in the model's chat template (ChatML for SmolLM2).
    #[arg(long)]
    pub chat: bool,

    /// System prompt for --chat (default: the template's own, if it has one).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,

    /// Maximum number of tokens to generate (llama.cpp's `-n/--n-predict`).
    #[arg(long, short = 'n', alias = "n-predict", default_value_t = 128)]
    pub max_tokens: usize,

    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// Speculative decoding with a draft: a model (same tokenizer as the target),
    /// `self-quant[:q8_0|q4_0|...]` (the target's own quantized copy), `self-layers:E` (the
    /// target's first E layers and its head) or `ngram[:N,K]` (prompt lookup: n-grams up to
    /// N, continuations up to K); `FIRST+THEN` drafts with FIRST and falls back to THEN
    /// (e.g. `ngram+MODEL`). Output is the same as without it. llama.cpp's
    /// `-md/--model-draft` are accepted for a model.
    #[arg(long, alias = "model-draft")]
    pub draft: Option<String>,

    #[command(flatten)]
    pub draft_cost: DraftCostArgs,

    #[command(flatten)]
    pub draft_bounds: DraftBoundsArgs,

    /// How many tokens to draft per step: `fixed:K`, `heuristic[:START]` (+2 after a fully
    /// accepted draft, -1 otherwise), `confidence[:T]` (stop when the draft's probability
    /// falls below T, default 0.4, re-tuned online) or `disco[:MODEL]` (stop where a trained
    /// classifier predicts a rejection; `dynexec spec train-lookahead` makes one).
    #[arg(long, default_value = "heuristic", requires = "draft")]
    pub lookahead: String,

    /// Per-token early exit (CALM): `classifier:T` (the exit's learned classifier gives at
    /// least T probability that the exit agrees with the last layer; the cheapest test),
    /// `confidence:T` (an exit's top-1 minus top-2 probability reaches T; costs an LM head
    /// per exit tried) or `saturation:T` (the hidden state's cosine across the exit layer
    /// reaches T); above 1 never exits. A token's skipped layers run later with the next
    /// token that goes deeper (exact; `:defer`, the default), or their keys and values come
    /// from the exit state at once (`:propagate`, e.g. `classifier:0.9:propagate`).
    #[arg(long, conflicts_with_all = ["draft", "trace"])]
    pub early_exit: Option<String>,

    /// Exit adapters (a manifest name or a folder with adapters.json) for --early-exit
    /// (default: the manifest's MODEL-exits) or for a `--draft self-layers:E` draft, whose
    /// hidden state then goes through layer E's adapter before the head.
    #[arg(long)]
    pub exit_adapters: Option<String>,

    /// Save the residual stream after each traced layer (safetensors + .json sidecar).
    #[arg(long)]
    pub trace: Option<PathBuf>,

    /// Layers to trace, e.g. 0,10,30 (0 = embeddings; default: every layer).
    #[arg(long, value_delimiter = ',', requires = "trace")]
    pub trace_layers: Option<Vec<usize>>,
}

#[derive(Serialize)]
struct GenerateReport<'a> {
    model: &'a str,
    text: &'a str,
    token_ids: &'a [u32],
    prompt_tokens: usize,
    generated_tokens: usize,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    ttft_ms: f64,
    device: String,
    stop_reason: StopReason,
    #[serde(flatten)]
    speculative: Option<SpeculativeReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    early_exit: Option<EarlyExitReport>,
}

pub fn run(global: &GlobalOptions, args: GenerateArgs) -> Result<()> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --prompt-file {}", path.display()))?,
        (None, None) => anyhow::bail!("give a prompt with --prompt TEXT or --prompt-file PATH"),
    };
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params(),
        stop_at_eos: !args.ignore_eos,
    };
    options.sampling.validate()?;
    if args.draft.is_some() && args.trace.is_some() {
        anyhow::bail!("--trace cannot be combined with --draft yet: run the trace without a draft (the output is the same)");
    }
    // Flags are checked before the (slow) model load.
    args.draft_cost.check_drafting(args.draft.is_some())?;
    let early_exit_policy = args
        .early_exit
        .as_deref()
        .map(TokenExitPolicy::parse)
        .transpose()?;
    let drafting = match args.draft.as_deref() {
        Some(draft) => Some((
            draft.parse::<DraftSpec>()?,
            dynexec_spec::lookahead::parse(&resolve_lookahead(
                global,
                &args.draft_bounds.apply(&args.lookahead),
            )?)?,
        )),
        None => None,
    };
    let loaded = args.model.load(global)?;
    let adapters = match (&args.early_exit, &args.exit_adapters) {
        (Some(_), reference) => {
            let reference = match reference {
                Some(r) => r.clone(),
                None => default_exit_adapters(global, &args.model.model)?,
            };
            Some(load_exit_adapters(global, &reference, &loaded.model)?)
        }
        (None, Some(reference)) if drafting.is_some() => {
            Some(load_exit_adapters(global, reference, &loaded.model)?)
        }
        (None, Some(_)) => {
            anyhow::bail!("--exit-adapters needs --early-exit or --draft self-layers:E")
        }
        (None, None) => None,
    };
    let mut strategy = match (drafting, early_exit_policy, &adapters) {
        (Some((draft, lookahead)), _, _) => Strategy::Speculative {
            drafter: build_drafter(
                global,
                &draft,
                &args.draft_cost,
                (&args.model.model, &loaded),
                adapters.as_ref(),
            )?,
            lookahead,
        },
        (None, Some(policy), Some(adapters)) => Strategy::EarlyExit { adapters, policy },
        _ => Strategy::Plain,
    };
    let LoadedDecoder {
        model, tokenizer, ..
    } = &loaded;
    let text = if args.chat {
        tokenizer.chat_prompt(args.system.as_deref(), &prompt)?
    } else {
        prompt
    };
    let prompt_ids = tokenizer.encode(&text)?;

    let num_layers = model.num_layers();
    let mut trace = args.trace.as_ref().map(|_| match &args.trace_layers {
        Some(layers) => Trace::new(layers.iter().copied()),
        None => Trace::new(0..=num_layers),
    });
    if let Some(bad) = args
        .trace_layers
        .iter()
        .flatten()
        .find(|&&l| l > num_layers)
    {
        anyhow::bail!("--trace-layers {bad} is past the model's {num_layers} layers (0 = embeddings, {num_layers} = last layer)");
    }

    let stdout = std::io::stdout();
    let stream = !global.json;
    let on_text = |piece: &str| {
        if stream {
            let mut out = stdout.lock();
            // A closed pipe (e.g. `| head`) ends generation quietly rather than panicking.
            out.write_all(piece.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| dynexec_core::Error::io("stdout", e))?;
        }
        Ok(())
    };
    let decoded = decode(
        model,
        tokenizer,
        &prompt_ids,
        &options,
        &mut strategy,
        trace.as_mut(),
        on_text,
    )?;
    let (result, speculative, early_exit) = (
        decoded.generation,
        decoded.report.speculative,
        decoded.report.early_exit,
    );

    if let (Some(trace), Some(path)) = (&trace, &args.trace) {
        let mut all_ids = prompt_ids.clone();
        all_ids.extend_from_slice(&result.token_ids);
        let info = trace.save(path, &args.model.model, &all_ids, prompt_ids.len())?;
        eprintln!("trace: {info} -> {}", path.display());
    }

    let stats = &result.stats;
    let device = device_name(model.device());
    if global.json {
        print_json(&GenerateReport {
            model: &args.model.model,
            text: &result.text,
            token_ids: &result.token_ids,
            prompt_tokens: stats.prompt_tokens,
            generated_tokens: stats.generated_tokens,
            prefill_tokens_per_s: stats.prefill_tokens_per_s(),
            decode_tokens_per_s: stats.decode_tokens_per_s(),
            ttft_ms: stats.ttft_secs * 1000.0,
            device,
            stop_reason: result.stop_reason,
            speculative,
            early_exit,
        })?;
    } else {
        println!();
        eprintln!(
            "prompt {} tokens, prefill {:.1} tok/s | generated {} tokens, decode {:.1} tok/s | ttft {:.0} ms | {} | stop: {:?}",
            stats.prompt_tokens,
            stats.prefill_tokens_per_s(),
            stats.generated_tokens,
            stats.decode_tokens_per_s(),
            stats.ttft_secs * 1000.0,
            device,
            result.stop_reason
        );
        if let Some(e) = &early_exit {
            eprintln!(
                "early exit {}: mean exit layer {:.1} of {} over {} decoded tokens",
                e.policy,
                e.mean_exit_layer,
                e.layers_total,
                e.exit_layers.len()
            );
        }
        if let Some(s) = &speculative {
            eprintln!(
                "draft {} / {}: acceptance {:.1}%, {:.2} drafts accepted per step, {} draft and {} target forwards, {:.0}% of the time drafting",
                s.draft,
                s.lookahead,
                s.acceptance_rate * 100.0,
                s.mean_accepted_length,
                s.draft_forwards,
                s.target_forwards,
                100.0 * s.draft_secs / (s.draft_secs + s.verify_secs).max(f64::EPSILON)
            );
        }
    }
    Ok(())
}
