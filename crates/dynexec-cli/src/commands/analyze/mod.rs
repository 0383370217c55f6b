//! `dynexec analyze`: how a served model's residual stream evolves across its layers, and
//! whether quantization, another prompt or another model change its dynamics (DSA) or its
//! geometry (Procrustes, CKA, RSA). `analyze compare` runs the same metrics on any arrays.
//!
//! A run captures a trace (the residual stream after every layer over the generated tokens),
//! saves it with a JSON sidecar, and writes per metric a layer × layer matrix (CSV, PNG
//! heatmap), every layer against the last, and — with a second system — a layer-by-layer
//! comparison. `--trace FILE` reruns the analysis from a saved trace, without the model.

mod compare;
mod exits;
mod groups;
mod report;
mod settings;
mod verdicts;

use crate::commands::common::ModelArgs;
use crate::options::GlobalOptions;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use dynexec_core::trace::{Trace, TraceInfo};
use dynexec_dsa::{Rank, Trajectories};
use dynexec_engine::trace::{self, read_trajectories, TraceInput};
use dynexec_quant::QuantTarget;
use dynexec_quant::WeightFormat;
use settings::{DsaArgs, MetricName};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum AnalyzeCommand {
    /// Compare two recordings (.npy, time x features or trials x time x features).
    Compare(compare::CompareArgs),
    /// Compare the inputs an early-exit classifier lets out early with those it runs to
    /// full depth, or, under per-token early exit, the tokens that exited at each adapter
    /// with those that went deeper.
    Exits(exits::ExitsArgs),
}

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  dynexec analyze --chat -p \"Explain why the sky is blue.\" -n 64 --out analysis/\n  dynexec analyze --quant f32 --vs-quant q8_0 -p \"The history of the United States\" --out analysis-q8/\n  dynexec analyze --trace analysis/trace.safetensors --metric all --out analysis-all/\n  dynexec analyze -m qwen2.5-coder-1.5b-instruct --vs-model qwen2.5-coder-0.5b-instruct --by-verdict --chat -p \"Write a Python function that merges two sorted lists.\" -n 256 --out analysis-draft/\n  dynexec analyze --trace traces/chatcmpl-1733180000-1.safetensors --out served/\n  dynexec analyze exits --model minilm-l6-reviews --out exits-reviews/\n  dynexec analyze compare A.npy B.npy --metric all --json"
)]
pub struct AnalyzeArgs {
    #[command(subcommand)]
    pub command: Option<AnalyzeCommand>,

    #[command(flatten)]
    pub model: ModelArgs,

    /// The prompt whose generation is traced (for an encoder such as minilm-l6: the text whose
    /// tokens are traced through every layer).
    #[arg(long, short)]
    pub prompt: Option<String>,

    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,

    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    pub chat: bool,

    /// Tokens to generate (greedy; end-of-sequence tokens do not stop it, so every run has
    /// the same length).
    #[arg(long, short = 'n', default_value_t = 64)]
    pub max_tokens: usize,

    /// Analyse a saved trace (from `analyze` or `generate --trace`) instead of running a model.
    #[arg(long, conflicts_with_all = ["prompt", "prompt_file", "vs_quant", "vs_prompt", "vs_model"])]
    pub trace: Option<PathBuf>,

    /// Second system, compared layer by layer: the same model converted to this precision
    /// (f32 vs int8: `--quant f32 --vs-quant q8_0`), run over the same tokens.
    #[arg(long, conflicts_with_all = ["vs_prompt", "vs_model", "vs_trace"])]
    pub vs_quant: Option<WeightFormat>,

    /// Second system: the same model on another prompt (easy vs hard inputs).
    #[arg(long, conflicts_with_all = ["vs_model", "vs_trace"])]
    pub vs_prompt: Option<String>,

    /// Second system: another model with the same tokenizer (draft vs target), run over the
    /// same tokens; layers are paired by relative depth.
    #[arg(long, conflicts_with = "vs_trace")]
    pub vs_model: Option<String>,

    /// Second system: a saved trace.
    #[arg(long)]
    pub vs_trace: Option<PathBuf>,

    /// With --vs-model DRAFT: decode speculatively with DRAFT as the draft (greedy, lossless)
    /// and compare, layer by layer in both models, the positions where the target accepted
    /// the draft's token with those where it rejected it.
    #[arg(long, requires = "vs_model", conflicts_with = "trace")]
    pub by_verdict: bool,

    /// The lookahead of --by-verdict's speculative run (default fixed:4).
    #[arg(long, requires = "by_verdict")]
    pub lookahead: Option<String>,

    #[command(flatten)]
    pub groups: groups::GroupArgs,

    /// Include the prompt's positions (by default only generated tokens are analysed: the
    /// prompt's first positions carry outlier activations that dominate every metric).
    #[arg(long)]
    pub include_prompt: bool,

    /// Folder for the trace, CSV, JSON and PNG outputs.
    #[arg(long, short, default_value = "dynexec-analysis")]
    pub out: PathBuf,

    /// Metrics (repeat or comma-separate): dsa, procrustes, cka, rsa or all.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "dsa,procrustes,cka"
    )]
    pub metric: Vec<MetricName>,

    /// DSA sees each layer's top K principal components: hidden states have more features
    /// than a generation has positions, and a delay embedding needs more rows than columns.
    /// (PCA is a rotation plus a cut, and DSA ignores rotations.) Capped so the embedding
    /// stays tall. Geometry metrics use the full states.
    #[arg(long, default_value_t = 16)]
    pub pca: usize,

    /// Skip the PNG heatmaps.
    #[arg(long)]
    pub no_plots: bool,

    #[command(flatten)]
    pub dsa: DsaArgs,
}

/// `--by-verdict`'s lookahead when none is given: a fixed number of drafts a step, so every
/// step proposes and the target's verdicts are many.
pub const DEFAULT_VERDICT_LOOKAHEAD: &str = "fixed:4";

/// The DMD rank for hidden states when no rank flag is given: they have hundreds of features
/// and tens of positions, so a full-rank fit would be mostly noise.
const HIDDEN_STATE_RANK: usize = 10;

/// One traced system: its layers' trajectories (positions × features).
pub struct System {
    pub info: TraceInfo,
    pub layers: Vec<(usize, Trajectories)>,
}

pub fn run(global: &GlobalOptions, args: AnalyzeArgs) -> Result<()> {
    match args.command {
        Some(AnalyzeCommand::Compare(compare_args)) => return compare::run(global, compare_args),
        Some(AnalyzeCommand::Exits(exits_args)) => return exits::run(global, exits_args),
        None => {}
    }
    let dsa = args.dsa.dsa(Rank::Count(HIDDEN_STATE_RANK))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;

    let verdict_paths = (
        args.out.join("trace.safetensors"),
        args.out.join("trace-vs-model.safetensors"),
    );
    let verdicts = match (&args.vs_model, args.by_verdict) {
        (Some(draft), true) => Some(verdicts::decode_and_trace(
            global,
            &args,
            &read_prompt(&args)?,
            draft,
            &verdict_paths.0,
            &verdict_paths.1,
        )?),
        _ => None,
    };
    let primary_path = match &args.trace {
        Some(path) => path.clone(),
        None if verdicts.is_some() => verdict_paths.0.clone(),
        None => {
            let prompt = read_prompt(&args)?;
            let path = args.out.join("trace.safetensors");
            let input = TraceInput::Generate {
                prompt: &prompt,
                chat: args.chat,
                max_tokens: args.max_tokens,
            };
            capture(global, &args, &args.model.model, global.quant, input, &path)?;
            path
        }
    };
    let primary = load_system(&primary_path, args.include_prompt)?;

    let second_path = match (
        &args.vs_trace,
        args.vs_quant,
        &args.vs_prompt,
        &args.vs_model,
    ) {
        (Some(path), ..) => Some(path.clone()),
        (None, Some(quant), _, _) => {
            let path = args.out.join(format!("trace-{quant}.safetensors"));
            replay(
                global,
                &args,
                &args.model.model,
                Some(QuantTarget::To(quant)),
                &primary_path,
                &path,
            )?;
            Some(path)
        }
        (None, None, Some(prompt), _) => {
            let path = args.out.join("trace-vs-prompt.safetensors");
            let input = TraceInput::Generate {
                prompt,
                chat: args.chat,
                max_tokens: args.max_tokens,
            };
            capture(global, &args, &args.model.model, global.quant, input, &path)?;
            Some(path)
        }
        (None, None, None, Some(_)) if verdicts.is_some() => Some(verdict_paths.1.clone()),
        (None, None, None, Some(model)) => {
            let path = args.out.join("trace-vs-model.safetensors");
            replay(global, &args, model, global.quant, &primary_path, &path)?;
            Some(path)
        }
        _ => None,
    };
    let second = second_path
        .map(|path| load_system(&path, args.include_prompt))
        .transpose()?;
    let label = second_label(&args);
    let extra = match &verdicts {
        Some(v) => {
            let traces = [
                ("target", verdict_paths.0.as_path()),
                ("draft", verdict_paths.1.as_path()),
            ];
            let (report, files) = verdicts::compare(global, &args, &dsa, v, traces)?;
            Some(("verdicts", serde_json::to_value(report)?, files))
        }
        None => None,
    };
    report::analyse(
        global,
        &args,
        &dsa,
        &primary,
        second.as_ref().map(|s| (s, label.as_str())),
        extra,
    )
}

fn second_label(args: &AnalyzeArgs) -> String {
    match (
        &args.vs_trace,
        args.vs_quant,
        &args.vs_prompt,
        &args.vs_model,
    ) {
        (Some(path), ..) => format!("vs trace {}", path.display()),
        (None, Some(quant), _, _) => format!("vs {quant}"),
        (None, None, Some(_), _) => "vs the other prompt".to_string(),
        (None, None, None, Some(model)) => format!("vs model {model}"),
        _ => String::new(),
    }
}

fn read_prompt(args: &AnalyzeArgs) -> Result<String> {
    match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --prompt-file {}", path.display())),
        (None, None) => bail!(
            "give a prompt with --prompt TEXT or --prompt-file PATH, or a saved trace with --trace FILE"
        ),
    }
}

/// Traces `model_name` (converted to `quant`) over `input` and saves the trace to `path`.
fn capture(
    global: &GlobalOptions,
    args: &AnalyzeArgs,
    model_name: &str,
    quant: Option<QuantTarget>,
    input: TraceInput<'_>,
    path: &Path,
) -> Result<TraceInfo> {
    let mut options = global.load_options(quant);
    options.tokenizer = args.model.tokenizer.clone();
    let bar = crate::options::progress_bar(
        global,
        args.max_tokens as u64,
        "tracing {prefix} {bar:30} {pos}/{len} tokens",
    );
    bar.set_prefix(model_name.to_string());
    let (hub, device) = (global.hub()?, global.open_device()?);
    let captured = trace::capture(&hub, &device, model_name, &options, input, || bar.inc(1))
        .with_context(|| format!("tracing {model_name}"))?;
    bar.finish_and_clear();
    if captured.truncated {
        let n = captured.token_ids.len();
        eprintln!("note: the text was cut to the {n} tokens its tokenizer.json allows");
    }
    let (ids, prompt) = (&captured.token_ids, captured.prompt_tokens);
    let info = captured.trace.save(path, model_name, ids, prompt)?;
    eprintln!("trace: {info} -> {}", path.display());
    Ok(info)
}

/// The second system of `--vs-quant` and `--vs-model`: the other model run over the primary
/// trace's own tokens (prompt and generated), so the comparison isolates the model and not
/// what it would have generated instead. An encoder simply encodes the same text.
fn replay(
    global: &GlobalOptions,
    args: &AnalyzeArgs,
    model_name: &str,
    quant: Option<QuantTarget>,
    primary_path: &Path,
    path: &Path,
) -> Result<TraceInfo> {
    let (primary, _) = Trace::load(primary_path)
        .with_context(|| format!("reading trace {}", primary_path.display()))?;
    let text = read_prompt(args)?;
    let input = TraceInput::Replay {
        token_ids: &primary.token_ids,
        prompt_tokens: primary.prompt_tokens,
        text: &text,
    };
    capture(global, args, model_name, quant, input, path)
}

/// Reads a saved trace into per-layer trajectories (generated positions only, unless
/// `include_prompt`).
fn load_system(path: &Path, include_prompt: bool) -> Result<System> {
    let (info, layers) = read_trajectories(path, include_prompt).with_context(|| {
        format!(
            "reading trace {} (generate more tokens with -n, or pass --include-prompt, if it is too short)",
            path.display()
        )
    })?;
    Ok(System { info, layers })
}
