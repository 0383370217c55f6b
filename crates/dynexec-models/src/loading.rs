//! From a model reference to a decoder ready to run, in one call: resolve the reference (a
//! manifest name, `hf:ORG/REPO`, a path), load it, convert its linear layers, choose the CPU
//! kernels and install a chat template. The CLI, the server, the drafters and the benchmarks
//! all load through [`load`], so a library user gets exactly what `dynexec generate` runs.

use crate::linear::{CpuKernels, HasLinears};
use crate::llama::{load_decoder, LoadedDecoder};
use crate::quantize::{quantize_auto, quantize_in_place, AutoReport, QuantTarget};
use crate::Result;
use candle_core::{DType, Device};
use dynexec_core::files::Resolve;
use dynexec_core::Error;
use std::path::{Path, PathBuf};

/// How to load a decoder: the front-end's settings, with their defaults.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Weight and activation dtype for safetensors models (`None`: the device's default).
    pub dtype: Option<DType>,
    /// Convert every linear layer to one format, or choose per layer (`auto`).
    pub quant: Option<QuantTarget>,
    /// Which kernels multiply on the CPU.
    pub cpu_kernels: CpuKernels,
    /// A tokenizer.json to use instead of the model's own.
    pub tokenizer: Option<PathBuf>,
    /// A Jinja chat template to use instead of the model's own.
    pub chat_template: Option<PathBuf>,
    /// Cap the context at this many tokens ([`crate::llama::Llama::limit_context`]).
    pub context: Option<usize>,
}

/// A loaded decoder and what loading chose for it.
pub struct Loaded {
    /// The decoder and its tokenizer.
    pub decoder: LoadedDecoder,
    /// What `auto` conversion kept and converted (only with [`QuantTarget::Auto`]).
    pub auto_report: Option<AutoReport>,
}

/// Resolves `reference` through `hub`, loads it on `device` and applies `options`.
///
/// Quantized layers take F32 activations, so with a conversion a dense model is loaded in F32
/// whatever `options.dtype` says (and so is it with `auto` on the CPU, where F32 has the fast
/// kernel). Errors say which model and which step failed.
pub fn load(
    hub: &dyn Resolve,
    reference: &str,
    device: &Device,
    options: &LoadOptions,
) -> Result<Loaded> {
    let files = hub.resolve(reference)?;
    let dtype = match options.quant {
        Some(QuantTarget::Auto) if !device.is_cpu() => options.dtype,
        Some(_) => Some(DType::F32),
        None => options.dtype,
    };
    let mut decoder = load_decoder(&files, options.tokenizer.as_deref(), dtype, device)
        .map_err(|e| e.context(format!("loading model `{reference}`")))?;
    let auto_report = match options.quant {
        Some(QuantTarget::To(format)) => {
            quantize_in_place(&mut decoder.model, format)
                .map_err(|e| e.context(format!("converting `{reference}` to {format}")))?;
            None
        }
        Some(QuantTarget::Auto) => Some(
            quantize_auto(&mut decoder.model, device.is_cpu())
                .map_err(|e| e.context(format!("choosing kernels for `{reference}`")))?,
        ),
        None => None,
    };
    decoder.model.set_cpu_kernels(options.cpu_kernels);
    if let Some(tokens) = options.context {
        decoder.model.limit_context(tokens)?;
    }
    if let Some(file) = &options.chat_template {
        set_chat_template_file(&mut decoder, file)?;
    }
    Ok(Loaded {
        decoder,
        auto_report,
    })
}

/// Replaces a loaded decoder's chat template with the Jinja template in `file`.
pub fn set_chat_template_file(decoder: &mut LoadedDecoder, file: &Path) -> Result<()> {
    let source = std::fs::read_to_string(file).map_err(|e| {
        Error::file(file, e).context(format!("reading the chat template {}", file.display()))
    })?;
    decoder
        .tokenizer
        .set_chat_template(&source, &format!("the chat template {}", file.display()))
}
