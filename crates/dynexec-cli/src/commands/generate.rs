//! `dynexec generate`: stream a completion and report its speed.

use crate::options::{print_json, GlobalOptions};
use anyhow::{Context, Result};
use clap::Args;
use dynexec_core::device::device_name;
use dynexec_core::sampling::SamplingParams;
use dynexec_core::trace::Trace;
use dynexec_exit::token_exit::{ExitAdapters, TokenExit, TokenExitPolicy, ADAPTERS_CARD};
use dynexec_models::generation::{generate, generate_with_step, GenerateOptions, StopReason};
use dynexec_models::linear::HasLinears;
use dynexec_models::llama::{load_decoder, LoadedDecoder};
use dynexec_quant::{quantize_auto, quantize_in_place, QuantTarget};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The model `generate` and `bench generate` use when none is named.
pub const DEFAULT_DECODER: &str = "smollm2-135m-instruct";

#[derive(Args)]
pub struct ModelArgs {
    /// Model: a manifest name (see `dynexec models list`), hf:ORG/REPO[@REV][:FILE], or a
    /// local GGUF file / transformers folder.
    #[arg(long, short, default_value = DEFAULT_DECODER)]
    pub model: String,

    /// Use this tokenizer.json instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,

    /// Render chat prompts with this Jinja chat template instead of the model's own
    /// (`tokenizer.chat_template` in the GGUF or tokenizer_config.json).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
}

impl ModelArgs {
    /// Loads the model, converted to `--quant` when given.
    pub fn load(&self, global: &GlobalOptions) -> Result<LoadedDecoder> {
        let mut loaded = load_model(global, &self.model, self.tokenizer.as_deref(), global.quant)?;
        use_chat_template(&mut loaded, self.chat_template.as_deref())?;
        Ok(loaded)
    }
}

/// Replaces the model's chat template with the one in `file`, if given.
pub fn use_chat_template(loaded: &mut LoadedDecoder, file: Option<&Path>) -> Result<()> {
    let Some(file) = file else {
        return Ok(());
    };
    let source = std::fs::read_to_string(file)
        .with_context(|| format!("reading the chat template {}", file.display()))?;
    loaded
        .tokenizer
        .set_chat_template(&source, &format!("the chat template {}", file.display()))
        .context("--chat-template")?;
    Ok(())
}

/// Loads a decoder and converts its linear layers to `quant`. Quantized layers take F32
/// activations, so a dense model is then loaded in F32 whatever `--dtype` says (and so is it
/// with `auto` on the CPU, where F32 has the fast kernel).
pub fn load_model(
    global: &GlobalOptions,
    model: &str,
    tokenizer: Option<&std::path::Path>,
    quant: Option<QuantTarget>,
) -> Result<LoadedDecoder> {
    let device = global.open_device()?;
    let files = global.hub()?.resolve(model)?;
    let dtype = match quant {
        Some(QuantTarget::Auto) if !device.is_cpu() => global.dtype,
        Some(_) => Some(candle_core::DType::F32),
        None => global.dtype,
    };
    let mut loaded = load_decoder(&files, tokenizer, dtype, &device)
        .with_context(|| format!("loading model `{model}`"))?;
    match quant {
        Some(QuantTarget::To(format)) => {
            quantize_in_place(&mut loaded.model, format)
                .with_context(|| format!("converting `{model}` to {format}"))?;
        }
        Some(QuantTarget::Auto) => {
            let report = quantize_auto(&mut loaded.model, device.is_cpu())
                .with_context(|| format!("choosing kernels for `{model}`"))?;
            if !global.quiet {
                eprintln!("--quant auto: {report}");
            }
        }
        None => {}
    }
    loaded.model.set_cpu_kernels(global.cpu_kernels);
    Ok(loaded)
}

#[derive(Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 means greedy (always the most likely token).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities sum to P.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Penalise recently generated tokens (1.0 = off; 1.1 is a common choice).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty considers.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed: the same seed gives the same output.
    #[arg(long, default_value_t = 299792458)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        }
    }
}

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

    /// Maximum number of tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: usize,

    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// Speculative decoding with a draft: a model (same tokenizer as the target),
    /// `self-quant[:q8_0|q4_0|...]` (the target's own quantized copy), `self-layers:E` (the
    /// target's first E layers and its head) or `ngram[:N,K]` (prompt lookup: n-grams up to
    /// N, continuations up to K). Output is the same as without it.
    #[arg(long)]
    pub draft: Option<String>,

    /// How many tokens to draft per step: `fixed:K`, `heuristic[:START]` (+2 after a fully
    /// accepted draft, -1 otherwise) or `confidence[:T]` (stop when the draft's probability
    /// falls below T, default 0.4, re-tuned online).
    #[arg(long, default_value = "heuristic", requires = "draft")]
    pub lookahead: String,

    /// Per-token early exit (CALM): `confidence:T` (an exit's top-1 minus top-2 probability
    /// reaches T) or `saturation:T` (the hidden state's cosine across the exit layer reaches
    /// T); the skipped layers' keys and values are filled from the exit state.
    #[arg(long, conflicts_with_all = ["draft", "trace"])]
    pub early_exit: Option<String>,

    /// Exit adapters (a manifest name or a folder with adapters.json) for --early-exit
    /// (default: smollm2-135m-instruct-exits) or for a `--draft self-layers:E` draft, whose
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

/// Keys `generate --json` adds with `--early-exit`.
#[derive(Serialize)]
struct EarlyExitReport {
    policy: String,
    mean_exit_layer: f64,
    layers_total: usize,
    /// The layer each decoded token left at (the first token comes from the full-depth prefill).
    exit_layers: Vec<usize>,
}

/// Keys `generate --json` adds when drafting.
#[derive(Serialize)]
struct SpeculativeReport {
    draft: String,
    lookahead: String,
    acceptance_rate: f64,
    mean_accepted_length: f64,
    draft_forwards: usize,
    target_forwards: usize,
    draft_secs: f64,
    verify_secs: f64,
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
    let early_exit_policy = args
        .early_exit
        .as_deref()
        .map(TokenExitPolicy::parse)
        .transpose()?;
    let loaded = args.model.load(global)?;
    let adapters = match (&args.early_exit, &args.exit_adapters) {
        (Some(_), reference) => Some(load_exit_adapters(
            global,
            reference.as_deref().unwrap_or(DEFAULT_EXIT_ADAPTERS),
            &loaded.model,
        )?),
        (None, Some(reference)) if args.draft.is_some() => {
            Some(load_exit_adapters(global, reference, &loaded.model)?)
        }
        (None, Some(_)) => {
            anyhow::bail!("--exit-adapters needs --early-exit or --draft self-layers:E")
        }
        (None, None) => None,
    };
    let mut drafting = match &args.draft {
        Some(spec) => Some((
            super::speculative::build_drafter(global, spec, &loaded, adapters.as_ref())?,
            dynexec_spec::lookahead::parse(&args.lookahead)?,
        )),
        None => None,
    };
    let LoadedDecoder {
        model, tokenizer, ..
    } = loaded;
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
    let mut token_exit = match (early_exit_policy, &adapters) {
        (Some(policy), Some(adapters)) => Some(TokenExit::new(&model, adapters, policy)?),
        _ => None,
    };
    let (result, speculative) = match drafting.as_mut() {
        Some((drafter, lookahead)) => {
            let out = dynexec_spec::engine::generate_speculative(
                &model,
                drafter.as_mut(),
                lookahead.as_mut(),
                &tokenizer,
                &prompt_ids,
                &options,
                on_text,
            )?;
            let s = out.spec;
            let report = SpeculativeReport {
                acceptance_rate: s.acceptance_rate(),
                mean_accepted_length: s.mean_accepted_length(),
                draft: s.draft,
                lookahead: s.lookahead,
                draft_forwards: s.draft_forwards,
                target_forwards: s.target_forwards,
                draft_secs: s.draft_secs,
                verify_secs: s.verify_secs,
            };
            (out.generation, Some(report))
        }
        None => match token_exit.as_mut() {
            Some(exit) => (
                generate_with_step(
                    &model,
                    &tokenizer,
                    &prompt_ids,
                    &options,
                    None,
                    |ids, cache, _| exit.step(ids, cache),
                    on_text,
                )?,
                None,
            ),
            None => (
                generate(
                    &model,
                    &tokenizer,
                    &prompt_ids,
                    &options,
                    trace.as_mut(),
                    on_text,
                )?,
                None,
            ),
        },
    };
    let early_exit = token_exit.map(|exit| EarlyExitReport {
        policy: exit.policy.to_string(),
        mean_exit_layer: mean(&exit.exit_layers),
        layers_total: num_layers,
        exit_layers: exit.exit_layers,
    });

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

/// The exit adapters shipped for the default decoder.
pub const DEFAULT_EXIT_ADAPTERS: &str = "smollm2-135m-instruct-exits";

/// Loads exit adapters by manifest name or folder and checks they fit `model`.
pub fn load_exit_adapters(
    global: &GlobalOptions,
    reference: &str,
    model: &dynexec_models::llama::Llama,
) -> Result<ExitAdapters> {
    let files = global.hub()?.resolve(reference)?;
    let card = files.find(ADAPTERS_CARD).with_context(|| {
        format!("`{reference}` holds no {ADAPTERS_CARD}: train adapters with `dynexec exits train-adapters`")
    })?;
    let adapters = ExitAdapters::load(card.parent().unwrap_or(Path::new(".")), model.device())?;
    adapters.check(model)?;
    Ok(adapters)
}

/// Mean of layer counts (0 for none).
pub fn mean(values: &[usize]) -> f64 {
    values.iter().sum::<usize>() as f64 / values.len().max(1) as f64
}
