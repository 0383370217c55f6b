//! Flags every subcommand shares.

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use dynexec_core::device::DeviceSpec;
use dynexec_core::Setting;
use dynexec_hub::Hub;
use dynexec_models::cpu_kernels::Isa;
use dynexec_models::linear::CpuKernels;
use dynexec_models::loading::LoadOptions;
use dynexec_quant::{QuantTarget, WeightFormat};
use std::path::{Path, PathBuf};

#[derive(Args, Clone)]
pub struct GlobalOptions {
    /// Device to run on: auto (CUDA, then Metal, then CPU), cpu, cuda, cuda:N or metal.
    #[arg(long, global = true, default_value = "auto")]
    pub device: DeviceSpec,

    /// Activation/weight dtype for safetensors models: f32, f16 or bf16 (default: f32 on CPU,
    /// bf16 on GPUs). GGUF models always compute in f32.
    #[arg(long, global = true, value_parser = parse_dtype)]
    pub dtype: Option<DType>,

    /// Convert every linear layer at load time: f32, f16, q8_0, q4_0 or q4_1 (embeddings and
    /// norms stay in float; `f32` dequantizes a quantized GGUF), or `auto`: keep each layer's
    /// stored type when a fast kernel multiplies it, convert it to the nearest fast type
    /// otherwise (Q2_K/Q3_K to q4_1, Q5 types to q8_0, f16 to f32), and say what it did.
    #[arg(long, global = true)]
    pub quant: Option<QuantTarget>,

    /// CPU kernels: `dynexec` (Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K with 15-16-bit activations, on AVX2
    /// and AVX-512 VNNI repacked eight rows at a time; attention over the KV cache in place;
    /// faster and more accurate) or `candle` (candle's own, bit-identical to candle-transformers).
    #[arg(long, global = true, default_value = "dynexec")]
    pub cpu_kernels: CpuKernels,

    /// Highest instruction set for dynexec's repacked CPU kernels: `avx2` or `avx512-vnni`
    /// (default: the best this CPU has). Every choice gives the same bits; lower it to
    /// measure one against another, or where the hypervisor hides what the CPU reports.
    #[arg(long, global = true)]
    pub max_cpu_isa: Option<Isa>,

    /// CPU threads for candle (default: physical cores). Recorded in benchmark output.
    #[arg(long, short = 't', global = true)]
    pub threads: Option<usize>,

    /// Print one JSON object on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// No progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("unknown dtype `{other}`: use f32, f16 or bf16")),
    }
}

impl GlobalOptions {
    /// Thread counts and the kernels' instruction set, before any tensor work: candle sizes
    /// its thread pools from these variables on first use.
    pub fn apply_process_settings(&self) {
        if let Some(n) = self.threads.filter(|&n| n > 0) {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        }
        dynexec_models::cpu_kernels::set_max_cpu_isa(self.max_cpu_isa);
    }

    pub fn open_device(&self) -> Result<Device> {
        Ok(self.device.open()?)
    }

    /// The one format `--quant` converts every layer to (none for `auto`, which chooses per
    /// layer at load time).
    pub fn quant_format(&self) -> Option<WeightFormat> {
        match self.quant {
            Some(QuantTarget::To(format)) => Some(format),
            _ => None,
        }
    }

    /// How models load under these flags, converted to `quant`.
    pub fn load_options(&self, quant: Option<QuantTarget>) -> LoadOptions {
        LoadOptions {
            dtype: self.dtype,
            quant,
            cpu_kernels: self.cpu_kernels,
            ..Default::default()
        }
    }

    pub fn hub(&self) -> Result<Hub> {
        let mut hub = Hub::from_env()?;
        hub.progress = !self.quiet;
        Ok(hub)
    }

    /// The folder of a data set: `given` when it is an existing path, else the manifest data
    /// set it names (or `default` when none is given), pulled into the cache on first use.
    pub fn data_dir(&self, given: Option<&Path>, default: &str) -> Result<PathBuf> {
        let name = match given {
            Some(path) if path.exists() => return Ok(path.to_path_buf()),
            Some(path) => path.to_string_lossy().into_owned(),
            None => default.to_string(),
        };
        let hub = self.hub()?;
        let pulled = hub.data_set(&name).map_err(|e| match (given, &e) {
            (Some(path), dynexec_core::Error::UnknownDataSet { .. }) => anyhow::anyhow!(
                "{} is neither a folder nor a data set name ({e})",
                path.display()
            ),
            (None, dynexec_core::Error::UnknownDataSet { .. }) => anyhow::anyhow!(
                "no data was given and `{name}` names no data set ({e}): pass the folder with --data"
            ),
            _ => e.into(),
        })?;
        if let Some(source) = &pulled.source {
            if !self.quiet {
                eprintln!(
                    "pulled data set {name} from {source} into {}",
                    pulled.dir.display()
                );
            }
        }
        Ok(pulled.dir)
    }
}

/// The flag that sets `setting`.
pub fn flag(setting: Setting) -> &'static str {
    match setting {
        Setting::Temperature => "--temperature",
        Setting::TopP => "--top-p",
        Setting::RepetitionPenalty => "--repeat-penalty",
        Setting::FrequencyPenalty => "--frequency-penalty",
        Setting::PresencePenalty => "--presence-penalty",
        Setting::LogitBias => "--logit-bias",
        Setting::ContextSize => "--ctx-size",
        Setting::Lookahead => "--lookahead",
        Setting::EarlyExit => "--early-exit",
        Setting::Draft => "--draft",
        Setting::DraftVocab => "--draft-vocab",
        Setting::ExitAdapters => "--exit-adapters",
        Setting::PerplexityContext => "--context",
        Setting::PerplexityStride => "--stride",
        Setting::Epochs => "--epochs",
        Setting::TrainingSteps => "--steps",
        Setting::Steps => "--steps",
        Setting::BatchSize => "--batch-size",
        Setting::LearningRate => "--learning-rate",
        Setting::LossWeights => "--loss-weights",
        Setting::ValidationSize => "--val-size",
        Setting::MaxAccuracyDrop => "--max-accuracy-drop",
    }
}

/// An error and its causes, outermost first and joined by `: ` (as anyhow's `{:#}` does),
/// with library errors about a setting worded by the flag that sets it.
pub fn error_message(err: &anyhow::Error) -> String {
    err.chain()
        .map(|cause| match cause.downcast_ref::<dynexec_core::Error>() {
            Some(e) => library_message(e),
            None => cause.to_string(),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// A library error in the CLI's terms: settings named by their flags.
fn library_message(err: &dynexec_core::Error) -> String {
    use dynexec_core::Error;
    match err {
        Error::Context { context, cause } => format!("{context}: {}", library_message(cause)),
        Error::InvalidSetting {
            setting,
            requirement,
        } => format!("{} {requirement}", flag(*setting)),
        Error::BadSpec {
            setting,
            spec,
            help,
        } => format!("bad {} `{spec}`: {help}", flag(*setting)),
        Error::NeedsTokenizer { reason } => {
            format!("{reason}: pass the model's tokenizer.json with --tokenizer PATH")
        }
        e @ Error::ContextOverflow { .. } => format!("{e} (--max-tokens)"),
        e => e.to_string(),
    }
}

/// Prints a serializable value as one JSON object on stdout.
pub fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// A progress bar on stderr (hidden with `--quiet`; indicatif also hides it off a terminal).
pub fn progress_bar(global: &GlobalOptions, len: u64, template: &str) -> indicatif::ProgressBar {
    if global.quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
