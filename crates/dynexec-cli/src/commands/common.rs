//! What several commands share: the model and sampling flags, loading through the library,
//! and reading data files.

use crate::options::{progress_bar, GlobalOptions};
use anyhow::{Context, Result};
use clap::Args;
use dynexec_core::sampling::SamplingParams;
use dynexec_diffusion::pipeline::Pipeline;
use dynexec_exit::calibrate::ExitPredictions;
use dynexec_exit::card::ExitCard;
use dynexec_exit::data::{Dataset, Splits};
use dynexec_exit::model::ExitClassifier;
use dynexec_exit::policy::ExitPolicy;
use dynexec_exit::token_exit::{ExitAdapters, ADAPTERS_CARD};
use dynexec_models::llama::{Llama, LoadedDecoder};
use dynexec_models::loading::{load, LoadOptions};
use dynexec_quant::perplexity::{perplexity, Perplexity, Window};
use dynexec_quant::{QuantTarget, WeightFormat};
use dynexec_spec::disco::{DEFAULT_DISCO, DISCO_CARD};
use dynexec_spec::draft_spec::{DraftSources, DraftSpec};
use dynexec_spec::token_ranking::{DraftVocab, DraftVocabSpec, TokenRanking, RANKING_FILE};
use std::path::{Path, PathBuf};

/// The model `generate` and `bench generate` use when none is named.
pub const DEFAULT_DECODER: &str = "smollm2-135m-instruct";

/// The exit adapters shipped for the default decoder.

/// The manifest's exit adapters for `model` (`MODEL-exits`), if it has them.
pub fn own_exit_adapters(global: &GlobalOptions, model: &str) -> Result<Option<String>> {
    let own = format!("{model}-exits");
    Ok(global.hub()?.manifest.get(&own).map(|_| own))
}

/// The exit adapters a model gets when none are named: the manifest's `MODEL-exits`.
pub fn default_exit_adapters(global: &GlobalOptions, model: &str) -> Result<String> {
    own_exit_adapters(global, model)?.with_context(|| {
        format!("the manifest has no exit adapters for `{model}`: name some with --exit-adapters NAME|DIR, or train them with `dynexec exits train-adapters --model {model} --out DIR`")
    })
}

#[derive(Args)]
pub struct ModelArgs {
    /// Model: a manifest name (see `dynexec models list`), hf:ORG/REPO[@REV][:FILE],
    /// hf:ORG/REPO:QUANT (the GGUF of that quantization; llama.cpp's `-hf ORG/REPO[:QUANT]`
    /// is read as this, Q4_K_M by default), or a local GGUF file / transformers folder.
    #[arg(long, short, default_value = DEFAULT_DECODER)]
    pub model: String,

    /// Use this tokenizer.json instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,

    /// Render chat prompts with this Jinja chat template instead of the model's own
    /// (`tokenizer.chat_template` in the GGUF or tokenizer_config.json).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,

    /// Cap the context at N tokens (llama.cpp's `-c`; default: the model's own). Longer
    /// prompts and generations are refused, and each sequence's KV cache stays within N.
    #[arg(long = "ctx-size", short = 'c', value_name = "N")]
    pub ctx_size: Option<usize>,
}

impl ModelArgs {
    /// Loads the model, converted to `--quant` when given.
    pub fn load(&self, global: &GlobalOptions) -> Result<LoadedDecoder> {
        let mut options = global.load_options(global.quant);
        options.tokenizer = self.tokenizer.clone();
        options.chat_template = self.chat_template.clone();
        options.context = self.ctx_size;
        load_with(global, &self.model, &options)
    }
}

/// Loads a decoder converted to `quant`, with the model's own tokenizer and template unless
/// `tokenizer` is given.
pub fn load_model(
    global: &GlobalOptions,
    model: &str,
    tokenizer: Option<&Path>,
    quant: Option<QuantTarget>,
) -> Result<LoadedDecoder> {
    let mut options = global.load_options(quant);
    options.tokenizer = tokenizer.map(Path::to_path_buf);
    load_with(global, model, &options)
}

fn load_with(global: &GlobalOptions, model: &str, options: &LoadOptions) -> Result<LoadedDecoder> {
    let loaded = load(&global.hub()?, model, &global.open_device()?, options)?;
    if let (Some(report), false) = (&loaded.auto_report, global.quiet) {
        eprintln!("--quant auto: {report}");
    }
    Ok(loaded.decoder)
}

#[derive(Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 means greedy (always the most likely token).
    #[arg(long, alias = "temp", default_value_t = 0.0)]
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
    /// OpenAI's frequency penalty in [-2, 2]: each generated token's logit loses this much
    /// per time it was generated (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty in [-2, 2]: every token generated so far loses this much
    /// once (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Add BIAS (-100 to 100) to token ID's logit, as `ID=BIAS` (llama.cpp's `ID+BIAS` and
    /// `ID-BIAS` also work); repeatable. -100 bans the token.
    #[arg(long, value_name = "ID=BIAS", value_parser = parse_logit_bias, allow_hyphen_values = true)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Random seed: the same seed gives the same output.
    #[arg(long, short = 's', default_value_t = 299792458)]
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
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: self.logit_bias.clone(),
            seed: self.seed,
        }
    }
}

/// `ID=BIAS`, `ID+BIAS` or `ID-BIAS`.
fn parse_logit_bias(text: &str) -> std::result::Result<(u32, f32), String> {
    let bad = || format!("`{text}` is not ID=BIAS (e.g. 15043=-100 bans token 15043)");
    let at = text.find(['=', '+', '-']).ok_or_else(bad)?;
    let id = text[..at].trim().parse().map_err(|_| bad())?;
    let bias = match &text[at..at + 1] {
        "=" => &text[at + 1..],
        _ => &text[at..],
    };
    Ok((id, bias.trim().parse().map_err(|_| bad())?))
}

/// What makes a draft model cheaper: flags shared by `generate`, `serve` and
/// `bench speculative`. Neither changes the output.
#[derive(Args, Clone, Default)]
pub struct DraftCostArgs {
    /// Convert a draft model's linear layers to this format (e.g. q4_0: a cheaper draft).
    #[arg(long)]
    pub draft_quant: Option<WeightFormat>,

    /// FR-Spec: a draft model proposes only the N most frequent tokens of a ranking, `N[:RANKING]`
    /// (a file or manifest name from `dynexec spec rank-tokens`; default
    /// qwen2.5-token-ranking), scoring them with their rows of its LM head alone.
    #[arg(long, value_name = "N[:RANKING]")]
    pub draft_vocab: Option<DraftVocabSpec>,
}

impl DraftCostArgs {
    /// Refuses these flags where nothing drafts (rather than ignoring them).
    pub fn check_drafting(&self, drafting: bool) -> Result<()> {
        if !drafting && (self.draft_quant.is_some() || self.draft_vocab.is_some()) {
            anyhow::bail!("--draft-quant and --draft-vocab shape a draft model: add --draft");
        }
        Ok(())
    }
}

/// The file `file_name` that `reference` names: `reference` itself when it is a file,
/// otherwise that file in the model folder or manifest model it resolves to (pulled if
/// needed). `make` tells the user how to produce one when it is missing.
fn named_file(
    global: &GlobalOptions,
    reference: &str,
    file_name: &str,
    make: &str,
) -> Result<PathBuf> {
    let path = Path::new(reference);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let files = global.hub()?.resolve(reference)?;
    Ok(files
        .find(file_name)
        .with_context(|| format!("`{reference}` holds no {file_name}: {make}"))?
        .to_path_buf())
}

/// Reads the ranking `--draft-vocab` names: a file, a model folder, or a manifest name.
pub fn load_draft_vocab(global: &GlobalOptions, spec: &DraftVocabSpec) -> Result<DraftVocab> {
    let file = named_file(
        global,
        &spec.ranking,
        RANKING_FILE,
        "count one with `dynexec spec rank-tokens`",
    )?;
    Ok(DraftVocab {
        size: spec.size,
        ranking: TokenRanking::read(&file)?,
    })
}

/// The drafter `--draft` names for the target `target_name` (named with the draft in
/// errors), loaded (for a draft model) the way the target was, and made cheaper as `cost`
/// asks.
pub fn build_drafter(
    global: &GlobalOptions,
    draft: &DraftSpec,
    cost: &DraftCostArgs,
    (target_name, target): (&str, &LoadedDecoder),
    exit_adapters: Option<&dynexec_exit::token_exit::ExitAdapters>,
) -> Result<Box<dyn dynexec_spec::drafter::Drafter>> {
    let (hub, device) = (global.hub()?, global.open_device()?);
    let vocab = match &cost.draft_vocab {
        Some(spec) => Some(load_draft_vocab(global, spec)?),
        None => None,
    };
    let sources = DraftSources {
        hub: &hub,
        device: &device,
        load_options: global.load_options(global.quant),
        draft_quant: cost.draft_quant,
        exit_adapters,
        draft_vocab: vocab.as_ref(),
    };
    draft
        .build(target, &sources)
        .with_context(|| format!("drafting with `{draft}` for `{target_name}`"))
}

/// A `--lookahead` with the DISCO classifier it names turned into its card's path: `disco`
/// (the default classifier), `disco:NAME` (a manifest name or folder) or `disco:FILE`;
/// other specs stay as they are.
pub fn resolve_lookahead(global: &GlobalOptions, spec: &str) -> Result<String> {
    // Bounds (`,min=N`, `,max=N`) follow the controller and are kept as they are.
    let (controller, ..) = dynexec_spec::lookahead::split_bounds(spec);
    let bounds = &spec[controller.len()..];
    let reference = match controller.split_once(':') {
        None if controller == "disco" => DEFAULT_DISCO,
        Some(("disco", reference)) => reference,
        _ => return Ok(spec.to_string()),
    };
    let card = named_file(
        global,
        reference,
        DISCO_CARD,
        "train a classifier with `dynexec spec train-lookahead`",
    )?;
    Ok(format!("disco:{}{bounds}", card.display()))
}

/// llama.cpp's bounds on the tokens drafted per step, over any `--lookahead`: flags shared
/// by `generate` and `serve`.
#[derive(Args, Clone, Default)]
pub struct DraftBoundsArgs {
    /// Draft at most N tokens per step, whatever the lookahead proposes (llama.cpp's
    /// `--draft-max`, transformers' `num_assistant_tokens` with a fixed schedule).
    #[arg(long, value_name = "N", requires = "draft")]
    pub draft_max: Option<usize>,

    /// Draft at least N tokens per step: the lookahead's early stops count only after N
    /// (llama.cpp's `--draft-min`, which instead drops shorter drafts).
    #[arg(long, value_name = "N", requires = "draft")]
    pub draft_min: Option<usize>,
}

impl DraftBoundsArgs {
    /// `lookahead` with these bounds appended (`,min=N`, `,max=N`), as the spec parser reads them.
    pub fn apply(&self, lookahead: &str) -> String {
        let mut spec = lookahead.to_string();
        if let Some(min) = self.draft_min {
            spec.push_str(&format!(",min={min}"));
        }
        if let Some(max) = self.draft_max {
            spec.push_str(&format!(",max={max}"));
        }
        spec
    }
}

/// Loads exit adapters by manifest name or folder and checks they fit `model`.
pub fn load_exit_adapters(
    global: &GlobalOptions,
    reference: &str,
    model: &Llama,
) -> Result<ExitAdapters> {
    let files = global.hub()?.resolve(reference)?;
    let card = files.find(ADAPTERS_CARD).with_context(|| {
        format!("`{reference}` holds no {ADAPTERS_CARD}: train adapters with `dynexec exits train-adapters`")
    })?;
    let adapters = ExitAdapters::load(card.parent().unwrap_or(Path::new(".")), model.device())?;
    adapters.check(model)?;
    Ok(adapters)
}

/// The `field` strings of the first `count` lines of a JSON-lines file.
pub fn read_jsonl(path: &Path, field: &str, count: usize) -> Result<Vec<String>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (`dynexec data pull prompts humaneval` fetches the prompt sets)",
            path.display()
        )
    })?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .take(count)
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("bad JSON line in {}", path.display()))?;
            v[field]
                .as_str()
                .map(str::to_string)
                .with_context(|| format!("no `{field}` string in {}", path.display()))
        })
        .collect()
}

/// A text file for perplexity (`--text`), which must not be empty.
pub fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading --text {} (`dynexec data path sotu` gives the State of the Union text)",
            path.display()
        )
    })?;
    anyhow::ensure!(
        !text.trim().is_empty(),
        "--text {} is empty",
        path.display()
    );
    Ok(text)
}

#[derive(Args, Clone)]
pub struct WindowArgs {
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// How far each window advances (a window scores only the tokens past the previous one).
    #[arg(long, default_value_t = 256)]
    pub stride: usize,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
}

impl WindowArgs {
    pub fn window(&self) -> Window {
        Window {
            context: self.context,
            stride: self.stride,
        }
    }
}

/// Tokenizes `text` (cut to `--max-tokens`) and scores it, with a progress bar.
pub fn evaluate(
    loaded: &LoadedDecoder,
    text: &str,
    window: &WindowArgs,
    global: &GlobalOptions,
) -> Result<Perplexity> {
    let mut tokens = loaded.tokenizer.encode(text)?;
    if let Some(max) = window.max_tokens {
        tokens.truncate(max);
    }
    let bar = progress_bar(
        global,
        tokens.len().saturating_sub(1) as u64,
        "perplexity [{bar:30}] {pos}/{len} tokens {per_sec}",
    );
    let result = perplexity(&loaded.model, &tokens, window.window(), |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    Ok(result)
}

/// Loads a text-to-image pipeline on the chosen device and dtype.
pub fn load_pipeline(global: &GlobalOptions, reference: &str) -> Result<Pipeline> {
    Ok(Pipeline::load(
        &global.hub()?,
        reference,
        &global.open_device()?,
        global.dtype,
    )?)
}

/// A prompt set: JSONL or CSV with `text` and `label` fields, as `(text, label)` pairs.
pub fn read_prompts(path: &Path) -> Result<Vec<(String, String)>> {
    let data = dynexec_exit::data::read_text(path)
        .with_context(|| format!("reading prompts {}", path.display()))?;
    let dynexec_exit::data::Examples::Text(texts) = data.inputs else {
        anyhow::bail!("{} holds no text prompts", path.display());
    };
    if texts.is_empty() {
        anyhow::bail!("{} holds no prompts", path.display());
    }
    Ok(texts.into_iter().zip(data.labels).collect())
}

/// Loads an exit model (a manifest name or a folder holding card.json) and its backbone,
/// converting the encoder's linear layers to `--quant` when given.
pub fn load_classifier(global: &GlobalOptions, reference: &str) -> Result<ExitClassifier> {
    let mut classifier = ExitClassifier::load(&global.hub()?, reference, &global.open_device()?)?;
    if let Some(format) = global.quant_format() {
        classifier.quantize(format).context("--quant")?;
    }
    Ok(classifier)
}

/// The splits in `dir`, class numbers named as `labels`.
pub fn read_splits(
    global: &GlobalOptions,
    dir: &Path,
    val_size: usize,
    labels: &[String],
) -> Result<Splits> {
    let device = global.open_device()?;
    Ok(dynexec_exit::data::read_named_splits(
        dir, val_size, labels, &device,
    )?)
}

/// The splits of an exit model's task, from `data` (a folder or a data set name) or else
/// from the data set named by the card's task, pulled on first use.
pub fn read_task_splits(
    global: &GlobalOptions,
    data: Option<&Path>,
    card: &ExitCard,
    val_size: usize,
) -> Result<Splits> {
    let dir = global.data_dir(data, &card.task)?;
    read_splits(global, &dir, val_size, &card.labels)
}

/// Every exit's predictions on a split, with a progress bar.
pub fn predict_split(
    global: &GlobalOptions,
    classifier: &ExitClassifier,
    data: &Dataset,
    batch_size: usize,
    what: &str,
) -> Result<ExitPredictions> {
    let bar = progress_bar(
        global,
        data.len() as u64,
        &format!("{what} {{bar:40}} {{pos}}/{{len}} [{{elapsed}}<{{eta}}]"),
    );
    let predictions = classifier.predict(data, batch_size, |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    Ok(predictions)
}

/// The policy a flag names; `calibrated` is the card's (full depth if it has none).
pub fn resolve_exit_policy(text: &str, card: &ExitCard) -> Result<ExitPolicy> {
    if text == "calibrated" && card.calibration.is_none() {
        eprintln!("note: the model's card has no calibrated policy; running full depth (calibrate with `dynexec exits calibrate`)");
    }
    Ok(card.policy(text)?)
}

/// Draws `chart` into the PNG at `path` and says where, noting a chart drawn without text
/// when no font was found.
pub fn write_curves(
    global: &GlobalOptions,
    path: &Path,
    chart: &dynexec_plot::curves::LineChart,
) -> Result<()> {
    let with_text = dynexec_plot::curves::write_png(chart, path)?;
    if !global.quiet {
        let note = match with_text {
            true => "",
            false => " (no font found: drawn without text; set DYNEXEC_FONT)",
        };
        eprintln!("wrote {}{note}", path.display());
    }
    Ok(())
}
