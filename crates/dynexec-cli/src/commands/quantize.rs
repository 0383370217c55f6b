//! `dynexec quantize MODEL --to FORMAT --out FILE.gguf`.

use super::common::load_model;
use crate::options::{print_json, GlobalOptions};
use anyhow::{Context, Result};
use clap::Args;
use dynexec_quant::gguf_export::{export_gguf, ExportSource};
use dynexec_quant::QuantTarget;
use dynexec_quant::WeightFormat;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Examples:\n  dynexec quantize smollm2-135m-instruct --to q8_0 --out smollm2-q8_0.gguf\n  dynexec quantize ./my-llama-folder --to q4_0 --out my-llama-q4_0.gguf\n  dynexec generate -m smollm2-q8_0.gguf --prompt \"Hello\""
)]
pub struct QuantizeArgs {
    /// The model to convert: a manifest name, hf:ORG/REPO[@REV][:FILE], a GGUF file or a
    /// transformers folder (config.json + safetensors + tokenizer.json).
    pub model: String,
    /// Target format of the linear layers: f32, f16, q8_0, q4_0 or q4_1.
    #[arg(long)]
    pub to: WeightFormat,
    /// Output GGUF file.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokenizer to embed when the model's own is not beside it.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(global: &GlobalOptions, args: QuantizeArgs) -> Result<()> {
    anyhow::ensure!(
        args.out.extension().is_some_and(|e| e == "gguf"),
        "--out must name a .gguf file, got {}",
        args.out.display()
    );
    let mut loaded = load_model(
        global,
        &args.model,
        args.tokenizer.as_deref(),
        Some(QuantTarget::To(args.to)),
    )?;
    let files = global.hub()?.resolve(&args.model)?;
    // The export borrows the model mutably, so the tokenizer it embeds is a copy.
    let tokenizer = loaded.tokenizer.clone();
    let source = match files.find(".gguf") {
        Some(path) => ExportSource::Gguf(path),
        None => ExportSource::Dense(&tokenizer),
    };
    let report = export_gguf(&mut loaded.model, args.to, source, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    if global.json {
        return print_json(&report);
    }
    println!(
        "wrote {} ({} tensors, {:.1} MB, linear layers {})",
        report.path,
        report.tensors,
        report.bytes as f64 / 1e6,
        report.format
    );
    Ok(())
}
