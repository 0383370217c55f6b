//! `dynexec analyze exits`: do the inputs early exit lets out move differently through the
//! model from those it keeps?
//!
//! - An exit classifier (`--model minilm-l6-reviews`): the test inputs are classified under
//!   the policy (the card's calibrated one by default), every input's first tokens are traced
//!   through every layer, and inputs that exited early are compared with those that ran to
//!   full depth, layer by layer.
//! - A decoder under per-token early exit (`--early-exit POLICY`): the prompts are decoded
//!   with exits, every position is traced at full depth (what deferred layers compute), and at
//!   each adapter the tokens that exited there are compared with those that went deeper.

use super::groups::{
    compare_and_write, print_report, stack_trials, GroupArgs, GroupOutput, GroupReport,
};
use super::settings::DsaArgs;
use crate::commands::common::{
    default_exit_adapters, load_classifier, load_exit_adapters, read_task_splits,
    resolve_exit_policy,
};
use crate::options::{print_json, GlobalOptions};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;
use dynexec_core::trace::Trace;
use dynexec_dsa::groups::{select_trials, Null};
use dynexec_dsa::{Rank, Trajectories};
use dynexec_engine::inspect::{position_windows, token_exit_layers};
use dynexec_engine::trace::{trace_encoder, trace_tokens};
use dynexec_exit::data::Examples;
use dynexec_exit::model::Backbone;
use dynexec_exit::token_exit::TokenExitPolicy;
use dynexec_models::loading::load;
use dynexec_plot::heatmap::{write_png, Heatmap};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Examples:\n  dynexec analyze exits --model minilm-l6-reviews --out exits-reviews/\n  dynexec analyze exits --model smollm2-135m-instruct --early-exit confidence:0.9 --chat \\\n    -p \"Explain photosynthesis.\" -p \"Name three rivers.\" -n 64 --out exits-smollm2/"
)]
pub struct ExitsArgs {
    /// An exit classifier (manifest name or folder with card.json), or, with --early-exit, a
    /// decoder with exit adapters.
    #[arg(long, short, default_value = "minilm-l6-reviews")]
    pub model: String,

    /// Classifier: its data set, a folder or name (default: the card's task); the test split
    /// is analysed.
    #[arg(long)]
    pub data: Option<PathBuf>,

    /// Classifier: the exit policy (default: the card's calibrated one).
    #[arg(long, default_value = "calibrated")]
    pub policy: String,

    /// Classifier: test inputs analysed (inputs shorter than --window tokens are skipped).
    #[arg(long, default_value_t = 300)]
    pub limit: usize,

    /// Decoder: the per-token exit policy, e.g. classifier:0.9 or confidence:0.9.
    #[arg(long)]
    pub early_exit: Option<String>,

    /// Decoder: exit adapters, a name or folder (default: the manifest's MODEL-exits).
    #[arg(long)]
    pub exit_adapters: Option<String>,

    /// Decoder: a prompt (repeat for several).
    #[arg(long, short)]
    pub prompt: Vec<String>,

    /// Decoder: prompts, one per line.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,

    /// Decoder: wrap each prompt as a user turn in the chat template.
    #[arg(long)]
    pub chat: bool,

    /// Decoder: tokens generated per prompt (end-of-sequence does not stop it).
    #[arg(long, short = 'n', default_value_t = 64)]
    pub max_tokens: usize,

    /// Folder for the CSV, JSON and PNG outputs.
    #[arg(long, short, default_value = "dynexec-exits-analysis")]
    pub out: PathBuf,

    /// DSA sees each layer's top K principal components.
    #[arg(long, default_value_t = 10)]
    pub pca: usize,

    /// Skip the PNG heatmaps.
    #[arg(long)]
    pub no_plots: bool,

    #[command(flatten)]
    pub groups: GroupArgs,

    #[command(flatten)]
    pub dsa: DsaArgs,
}

#[derive(Serialize)]
struct ClassifierExits {
    model: String,
    policy: String,
    inputs: usize,
    skipped_short: usize,
    /// Inputs per exit layer (1-based: exited after that layer), short ones included.
    exit_counts: BTreeMap<usize, usize>,
    comparison: GroupReport,
    files: Vec<PathBuf>,
}

#[derive(Serialize)]
struct TokenExits {
    model: String,
    policy: String,
    prompts: usize,
    positions: usize,
    /// Decoding steps per exit layer (the model's depth: did not exit), those too close to
    /// the start for a window included.
    exit_counts: BTreeMap<usize, usize>,
    /// Per adapter layer: the tokens that exited there against those that went deeper.
    by_exit_layer: BTreeMap<usize, GroupReport>,
    /// Adapter layers with too few exits (or too few going deeper) to compare.
    too_few: Vec<usize>,
    files: Vec<PathBuf>,
}

pub fn run(global: &GlobalOptions, args: ExitsArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;
    match &args.early_exit {
        Some(policy) => token_exits(global, &args, policy),
        None => classifier_exits(global, &args),
    }
}

fn classifier_exits(global: &GlobalOptions, args: &ExitsArgs) -> Result<()> {
    let dsa = args.dsa.dsa(Rank::Count(super::HIDDEN_STATE_RANK))?;
    let classifier = load_classifier(global, &args.model)?;
    let card = classifier.card.clone();
    let Backbone::Text { bert, tokenizer } = &classifier.backbone else {
        bail!("`{}` classifies images: `analyze exits` compares text inputs (an encoder's tokens); for a decoder pass --early-exit", args.model);
    };
    let policy = resolve_exit_policy(&args.policy, &card)?;
    let splits = read_task_splits(global, args.data.as_deref(), &card, 5000)?;
    let test = splits.test.take(args.limit)?;
    let Examples::Text(texts) = &test.inputs else {
        bail!("the data set holds images, not text");
    };
    let classified = classifier.classify(&test.inputs, &policy)?;
    let depth = classifier.num_exits();
    let window = args.groups.window;
    let mut parts = Vec::new();
    let mut early = Vec::new();
    let mut exit_counts = BTreeMap::new();
    let mut skipped_short = 0;
    for (text, answer) in texts.iter().zip(&classified) {
        *exit_counts.entry(answer.exit_layer).or_insert(0) += 1;
        let ids = tokenizer.encode(text)?;
        // Position 0 is the [CLS] token, an outlier in every layer: the window starts after it.
        if ids.len() <= window {
            skipped_short += 1;
            continue;
        }
        let layers = layer_states(&trace_encoder(bert, &ids)?)?;
        parts.push(position_windows(&layers, &[window], window)?);
        early.push(answer.exit_layer < depth);
    }
    let layers = stack_trials(parts)?;
    let output = GroupOutput {
        dir: &args.out,
        stem: "exits-classifier".into(),
        title: format!(
            "DSA, inputs that exit early vs at full depth ({})",
            args.model
        ),
        plots: !args.no_plots,
    };
    let (comparison, files) = compare_and_write(
        &layers,
        &early,
        ["exit early", "full depth"],
        &dsa,
        &args.groups,
        // Separate inputs: shuffled.
        Null::Shuffle,
        args.pca,
        global.threads,
        &output,
    )?;
    let report = ClassifierExits {
        model: args.model.clone(),
        policy: args.policy.clone(),
        inputs: early.len(),
        skipped_short,
        exit_counts,
        comparison,
        files,
    };
    finish(global, args, &report, |r| {
        println!("exit layers (inputs): {:?}", r.exit_counts);
        print_report(&format!("{} ({})", r.model, r.policy), &r.comparison);
        &r.files
    })
}

fn token_exits(global: &GlobalOptions, args: &ExitsArgs, policy_spec: &str) -> Result<()> {
    let dsa = args.dsa.dsa(Rank::Count(super::HIDDEN_STATE_RANK))?;
    let policy = TokenExitPolicy::parse(policy_spec)?;
    let prompts = read_prompts(args)?;
    let (hub, device) = (global.hub()?, global.open_device()?);
    let loaded = load(
        &hub,
        &args.model,
        &device,
        &global.load_options(global.quant),
    )
    .with_context(|| format!("loading {}", args.model))?
    .decoder;
    let adapters_ref = match &args.exit_adapters {
        Some(name) => name.clone(),
        None => default_exit_adapters(global, &args.model)?,
    };
    let adapters = load_exit_adapters(global, &adapters_ref, &loaded.model)?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let window = args.groups.window;
    let mut parts = Vec::new();
    let mut exit_of_trial = Vec::new();
    let mut exit_counts = BTreeMap::new();
    for prompt in &prompts {
        let text = match args.chat {
            true => tokenizer.chat_prompt(None, prompt)?,
            false => prompt.clone(),
        };
        let prompt_ids = tokenizer.encode(&text)?;
        let (tokens, exits) = token_exit_layers(
            model,
            tokenizer,
            &adapters,
            policy,
            &prompt_ids,
            args.max_tokens,
        )?;
        let layers = layer_states(&trace_tokens(model, &tokens)?)?;
        // Step i ran position prompt_ids.len() + i and exited after exits[i] layers.
        let mut ends = Vec::new();
        for (i, &exit) in exits.iter().enumerate() {
            *exit_counts.entry(exit).or_insert(0) += 1;
            let position = prompt_ids.len() + i;
            if position >= window && position < tokens.len() - 1 {
                ends.push(position);
                exit_of_trial.push(exit);
            }
        }
        if !ends.is_empty() {
            parts.push(position_windows(&layers, &ends, window)?);
        }
    }
    let layers = stack_trials(parts)?;
    let mut by_exit_layer = BTreeMap::new();
    let mut too_few = Vec::new();
    let mut files = Vec::new();
    for &k in &adapters.card.layers {
        // Tokens that reached adapter k: those that exited there against those that went on.
        let reached: Vec<bool> = exit_of_trial.iter().map(|&e| e >= k).collect();
        let exited: Vec<bool> = exit_of_trial
            .iter()
            .filter(|&&e| e >= k)
            .map(|&e| e == k)
            .collect();
        let (n_exit, n_deeper) = (
            exited.iter().filter(|&&x| x).count(),
            exited.iter().filter(|&&x| !x).count(),
        );
        if n_exit < 2 || n_deeper < 2 {
            too_few.push(k);
            continue;
        }
        let subset: Vec<(usize, Trajectories)> = layers
            .iter()
            .map(|(l, t)| Ok((*l, select_trials(t, &reached, true)?)))
            .collect::<Result<_>>()?;
        let output = GroupOutput {
            dir: &args.out,
            stem: format!("exits-layer{k}"),
            title: String::new(),
            plots: false,
        };
        let (report, written) = compare_and_write(
            &subset,
            &exited,
            ["exited", "went deeper"],
            &dsa,
            &args.groups,
            // Positions of texts, in order: labels are rotated, not shuffled.
            Null::Rotate,
            args.pca,
            global.threads,
            &output,
        )?;
        files.extend(written);
        by_exit_layer.insert(k, report);
    }
    if by_exit_layer.is_empty() {
        bail!(
            "no adapter layer had at least 2 tokens exiting there and 2 going deeper ({exit_counts:?} by exit layer): give more prompts, more tokens (-n), or a looser policy"
        );
    }
    if !args.no_plots {
        files.push(summary_heatmap(args, &by_exit_layer)?);
    }
    let report = TokenExits {
        model: args.model.clone(),
        policy: policy_spec.to_string(),
        prompts: prompts.len(),
        positions: exit_of_trial.len(),
        exit_counts,
        by_exit_layer,
        too_few,
        files,
    };
    finish(global, args, &report, |r| {
        println!("exit layers (positions): {:?}", r.exit_counts);
        for (k, comparison) in &r.by_exit_layer {
            print_report(&format!("adapter after layer {k}"), comparison);
        }
        if !r.too_few.is_empty() {
            println!("adapters with too few exits to compare: {:?}", r.too_few);
        }
        &r.files
    })
}

/// One row per adapter layer, one column per traced layer: DSA between the exited tokens and
/// those that went deeper, as a multiple of its shuffled-label null (1 = no difference).
fn summary_heatmap(args: &ExitsArgs, by_exit: &BTreeMap<usize, GroupReport>) -> Result<PathBuf> {
    let rows: Vec<String> = by_exit.keys().map(|k| k.to_string()).collect();
    let first = by_exit.values().next().context("no comparisons")?;
    let columns: Vec<String> = first.layers.iter().map(|r| r.layer.to_string()).collect();
    let values: Vec<f64> = by_exit
        .values()
        .flat_map(|report| report.layers.iter().map(|r| r.dsa_angular / r.dsa_null))
        .collect();
    let png = args.out.join("exits-dsa-vs-null.png");
    let title = format!(
        "DSA exited vs deeper / null ({}, {})",
        args.model,
        args.early_exit.as_deref().unwrap_or("")
    );
    write_png(
        &Heatmap {
            title: &title,
            row_labels: &rows,
            column_labels: &columns,
            row_axis: "adapter (exit) layer",
            column_axis: "layer",
            values: &values,
        },
        &png,
    )?;
    Ok(png)
}

/// Every traced layer's states, `(layer, positions × features)`.
fn layer_states(trace: &Trace) -> Result<Vec<(usize, Tensor)>> {
    let mut layers = Vec::new();
    for layer in trace.layers() {
        if let Some(states) = trace.layer(layer)? {
            layers.push((layer, states));
        }
    }
    Ok(layers)
}

fn read_prompts(args: &ExitsArgs) -> Result<Vec<String>> {
    let mut prompts = args.prompt.clone();
    if let Some(path) = &args.prompt_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --prompt-file {}", path.display()))?;
        prompts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    if prompts.is_empty() {
        bail!("give the decoder prompts with --prompt TEXT (repeat it) or --prompt-file PATH (one per line)");
    }
    Ok(prompts)
}

/// Writes `exits.json`, then prints it (--json) or the summary `show` gives.
fn finish<T: Serialize>(
    global: &GlobalOptions,
    args: &ExitsArgs,
    report: &T,
    show: impl FnOnce(&T) -> &Vec<PathBuf>,
) -> Result<()> {
    let json_path = args.out.join("exits.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    if global.json {
        return print_json(report);
    }
    for file in show(report) {
        println!("wrote {}", file.display());
    }
    println!("wrote {}", json_path.display());
    Ok(())
}
