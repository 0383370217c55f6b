//! `analyze --vs-model DRAFT --by-verdict`: the target decodes speculatively with the draft
//! (greedy, lossless: the tokens are the target's own), both models are traced over those
//! tokens, and the positions where the target accepted the draft's token are compared, layer
//! by layer, with those where it rejected it — in the target and in the draft.
//!
//! A position is labelled by the verdict on the token it predicts: the state at position
//! `p` produced the target's logits that accepted or rejected the draft's token `p + 1`.
//! Positions where nothing was drafted (or every draft was kept, so the target added its
//! own token) are left out.

use super::groups::{compare_and_write, print_report, GroupOutput, GroupReport};
use super::{AnalyzeArgs, DEFAULT_VERDICT_LOOKAHEAD};
use crate::options::GlobalOptions;
use anyhow::{bail, Context, Result};
use dynexec_core::trace::Trace;
use dynexec_dsa::groups::Null;
use dynexec_dsa::Dsa;
use dynexec_engine::inspect::{position_windows, speculative_verdicts};
use dynexec_engine::trace::trace_tokens;
use dynexec_models::loading::load;
use dynexec_spec::draft_spec::check_same_tokens;
use dynexec_spec::drafter::ModelDrafter;
use dynexec_spec::engine::TokenOrigin;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What the speculative run decided, position by position.
pub struct Verdicts {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// The origin of each generated token.
    pub origins: Vec<TokenOrigin>,
}

/// The accepted-vs-rejected comparison in both models (`verdicts` in analysis.json).
#[derive(Serialize)]
pub struct VerdictReport {
    pub draft: String,
    pub lookahead: String,
    pub generated: usize,
    pub accepted_positions: usize,
    pub rejected_positions: usize,
    pub in_target: GroupReport,
    pub in_draft: GroupReport,
}

/// Decodes the prompt speculatively with `draft_name` as the draft and saves both models'
/// traces over the tokens: the target's to `primary_path`, the draft's to `draft_path`.
pub fn decode_and_trace(
    global: &GlobalOptions,
    args: &AnalyzeArgs,
    prompt: &str,
    draft_name: &str,
    primary_path: &Path,
    draft_path: &Path,
) -> Result<Verdicts> {
    let mut options = global.load_options(global.quant);
    options.tokenizer = args.model.tokenizer.clone();
    let (hub, device) = (global.hub()?, global.open_device()?);
    let target_name = &args.model.model;
    let target = load(&hub, target_name, &device, &options)
        .with_context(|| format!("loading {target_name}"))?
        .decoder;
    let draft = load(&hub, draft_name, &device, &options)
        .with_context(|| format!("loading the draft {draft_name}"))?
        .decoder;
    check_same_tokens(&target, &draft)?;
    let tokenizer = &target.tokenizer;
    let text = match args.chat {
        true => tokenizer.chat_prompt(None, prompt)?,
        false => prompt.to_string(),
    };
    let prompt_ids = tokenizer.encode(&text)?;
    let mut drafter = ModelDrafter::new(draft.model.clone(), draft_name);
    let lookahead_spec = args
        .lookahead
        .as_deref()
        .unwrap_or(DEFAULT_VERDICT_LOOKAHEAD);
    let mut lookahead = dynexec_spec::lookahead::parse(lookahead_spec)?;
    eprintln!(
        "decoding {} tokens speculatively ({lookahead_spec})...",
        args.max_tokens
    );
    let (tokens, origins) = speculative_verdicts(
        &target.model,
        &mut drafter,
        lookahead.as_mut(),
        tokenizer,
        &prompt_ids,
        args.max_tokens,
    )?;
    for (model, name, path) in [
        (&target.model, target_name.as_str(), primary_path),
        (&draft.model, draft_name, draft_path),
    ] {
        let info = trace_tokens(model, &tokens)
            .with_context(|| format!("tracing {name}"))?
            .save(path, name, &tokens, prompt_ids.len())?;
        eprintln!("trace: {info} -> {}", path.display());
    }
    Ok(Verdicts {
        prompt_tokens: prompt_ids.len(),
        origins,
    })
}

/// Compares accepted with rejected positions in both traces; writes `verdicts-target.csv`,
/// `verdicts-draft.csv` and their heatmaps.
pub fn compare(
    global: &GlobalOptions,
    args: &AnalyzeArgs,
    dsa: &Dsa,
    verdicts: &Verdicts,
    traces: [(&str, &Path); 2],
) -> Result<(VerdictReport, Vec<PathBuf>)> {
    let window = args.groups.window;
    let mut ends = Vec::new();
    let mut accepted = Vec::new();
    // Generated token j (j >= 1) was judged by the target's logits at position
    // prompt_tokens + j - 1.
    for (j, origin) in verdicts.origins.iter().enumerate().skip(1) {
        let position = verdicts.prompt_tokens + j - 1;
        let label = match origin {
            TokenOrigin::Accepted => true,
            TokenOrigin::Rejected => false,
            TokenOrigin::Target => continue,
        };
        if position >= window {
            ends.push(position);
            accepted.push(label);
        }
    }
    let counts = (
        accepted.iter().filter(|&&a| a).count(),
        accepted.iter().filter(|&&a| !a).count(),
    );
    if counts.0 < 2 || counts.1 < 2 {
        bail!(
            "the target accepted {} and rejected {} drafts: too few of one kind to compare; generate more tokens with -n, or try another prompt or --lookahead",
            counts.0,
            counts.1
        );
    }
    let mut reports = Vec::new();
    let mut files = Vec::new();
    for (role, path) in traces {
        let (info, tensors) =
            Trace::load(path).with_context(|| format!("reading trace {}", path.display()))?;
        let layers: Vec<_> = tensors.into_iter().collect();
        let windows = position_windows(&layers, &ends, window)?;
        let output = GroupOutput {
            dir: &args.out,
            stem: format!("verdicts-{role}"),
            title: format!("DSA, accepted vs rejected drafts, in {}", info.model),
            plots: !args.no_plots,
        };
        let (report, written) = compare_and_write(
            &windows,
            &accepted,
            ["accepted", "rejected"],
            dsa,
            &args.groups,
            // Positions of one text, in order: labels are rotated, not shuffled.
            Null::Rotate,
            args.pca,
            global.threads,
            &output,
        )?;
        if !global.json {
            print_report(&format!("{role} ({})", info.model), &report);
        }
        reports.push(report);
        files.extend(written);
    }
    let in_draft = reports.pop().context("no draft report")?;
    let in_target = reports.pop().context("no target report")?;
    Ok((
        VerdictReport {
            draft: args.vs_model.clone().unwrap_or_default(),
            lookahead: args
                .lookahead
                .clone()
                .unwrap_or(DEFAULT_VERDICT_LOOKAHEAD.to_string()),
            generated: verdicts.origins.len(),
            accepted_positions: counts.0,
            rejected_positions: counts.1,
            in_target,
            in_draft,
        },
        files,
    ))
}
