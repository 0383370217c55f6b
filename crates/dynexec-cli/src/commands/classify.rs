//! `dynexec classify`: label sentences or images with an exit model, each stopping at the
//! layer its policy allows.

use super::common::{load_classifier, resolve_exit_policy};
use crate::options::{print_json, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use dynexec_exit::card::InputKind;
use dynexec_exit::data::Examples;
use dynexec_plot::images::read_grey_images;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args)]
pub struct ClassifyArgs {
    /// Exit model: a manifest name (minilm-l6-reviews, cnn-fashion-mnist) or a folder with
    /// card.json and exits.safetensors.
    #[arg(long, short)]
    model: String,
    /// Sentences (text models) or image paths (image models; PNG, resized to the model's
    /// input and converted to grey; Fashion-MNIST is a light garment on black).
    inputs: Vec<String>,
    /// Also read inputs from this file, one per line.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Exit policy: calibrated (the card's), confidence:T, entropy:T, patience:N, fixed:K or
    /// full; T is one threshold or one per exit, comma separated.
    #[arg(long, default_value = "calibrated")]
    policy: String,
    /// Inputs per batch (inputs that exit leave the batch; the rest run on).
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
}

#[derive(Serialize)]
struct Row<'a> {
    input: &'a str,
    label: String,
    confidence: f32,
    exit_layer: usize,
    layers_total: usize,
}

pub fn run(global: &GlobalOptions, args: ClassifyArgs) -> Result<()> {
    let mut inputs = args.inputs.clone();
    if let Some(file) = &args.file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading inputs from {}", file.display()))?;
        inputs.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    if inputs.is_empty() {
        bail!("nothing to classify: give inputs as arguments or --file (one per line)");
    }
    let classifier = load_classifier(global, &args.model)?;
    let policy = resolve_exit_policy(&args.policy, &classifier.card)?;
    let layers = classifier.card.layers;
    let side = classifier.card.cnn.as_ref().map_or(28, |c| c.image_size);
    let mut rows = Vec::with_capacity(inputs.len());
    for batch in inputs.chunks(args.batch_size.max(1)) {
        let examples = match classifier.card.kind {
            InputKind::Text => Examples::Text(batch.to_vec()),
            InputKind::Image => {
                Examples::Images(read_grey_images(batch, side, &classifier.device)?)
            }
        };
        for (input, c) in batch.iter().zip(classifier.classify(&examples, &policy)?) {
            let row = Row {
                input,
                label: c.label,
                confidence: c.confidence,
                exit_layer: c.exit_layer,
                layers_total: layers,
            };
            if !global.json {
                println!(
                    "{}\t{:.3}\texit {}/{}\t{}",
                    row.label, row.confidence, row.exit_layer, layers, row.input
                );
            }
            rows.push(row);
        }
    }
    if global.json {
        print_json(&serde_json::json!({ "policy": policy.to_string(), "results": rows }))?;
    }
    Ok(())
}
