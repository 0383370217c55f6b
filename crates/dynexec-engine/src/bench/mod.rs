//! The generation benchmark: prefill and decode speed of several implementations of one
//! decoder, run in turn so machine-load drift hits all alike, as `bench generate` reports it.
//!
//! A [`Contestant`] prefills a prompt and greedy-decodes: dynexec ([`Greedy`]), dynexec held
//! to an instruction set ([`HeldToIsa`]), candle-transformers on the same GGUF
//! ([`CandlePeer`]) or llama.cpp's `llama-bench` ([`llama_cpp::LlamaCpp`]).
//! [`run_generation`] measures them all and [`Row::ratio`] compares them.

pub mod llama_cpp;
pub mod quant;
pub mod records;
pub mod speculative;
pub mod token_exits;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use dynexec_core::stats::{interleave, Summary};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::{Error, Result};
use dynexec_models::cpu_kernels::{set_max_cpu_isa, Isa};
use dynexec_models::llama::Llama;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// One implementation under test.
pub trait Contestant {
    /// The row name.
    fn name(&self) -> &'static str;
    /// Prefills `prompt`, then takes `gen_tokens` greedy steps; returns (prefill secs,
    /// decode secs).
    fn run(&mut self, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)>;
}

/// Text the synthetic benchmark prompt is cut from (repeated as needed).
const BENCH_TEXT: &str = "The history of computing is a story of ideas that moved from laboratories into everyday \
life. Early machines filled rooms and needed teams of engineers, while today a phone in a pocket holds more power \
than all of them together. Along the way, people learned to describe problems precisely, to measure what programs \
cost, and to trade memory for time. ";

/// The synthetic prompt of `len` tokens every generation benchmark decodes from.
pub fn bench_prompt(tokenizer: &TextTokenizer, len: usize) -> Result<Vec<u32>> {
    let mut prompt = Vec::new();
    while prompt.len() < len {
        prompt.extend(tokenizer.encode(BENCH_TEXT)?);
    }
    prompt.truncate(len);
    Ok(prompt)
}

/// dynexec's decoder: one full-depth forward per token.
pub struct Greedy<'a>(pub &'a Llama);

impl Contestant for Greedy<'_> {
    fn name(&self) -> &'static str {
        "dynexec"
    }

    fn run(&mut self, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)> {
        let model = self.0;
        let mut cache = model.new_cache();
        let start = Instant::now();
        let logits = model.forward_last(prompt, &mut cache, None)?;
        let mut next = logits.argmax(0)?.to_scalar::<u32>()?;
        let prefill = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for _ in 0..gen_tokens {
            let logits = model.forward_last(&[next], &mut cache, None)?;
            next = logits.argmax(0)?.to_scalar::<u32>()?;
        }
        Ok((prefill, start.elapsed().as_secs_f64()))
    }
}

/// dynexec with its repacked kernels held to one instruction set during its runs.
pub struct HeldToIsa<'a> {
    /// The decoder.
    pub model: &'a Llama,
    /// The instruction set its kernels are held to.
    pub isa: Isa,
    /// The process's own limit, restored after each run.
    pub restore: Option<Isa>,
}

impl HeldToIsa<'_> {
    /// The row name of dynexec held to `isa`.
    pub fn name_on(isa: Isa) -> &'static str {
        match isa {
            Isa::Avx2 => "dynexec --max-cpu-isa avx2",
            Isa::Avx512Vnni => "dynexec --max-cpu-isa avx512-vnni",
        }
    }
}

impl Contestant for HeldToIsa<'_> {
    fn name(&self) -> &'static str {
        Self::name_on(self.isa)
    }

    fn run(&mut self, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)> {
        set_max_cpu_isa(Some(self.isa));
        let times = Greedy(self.model).run(prompt, gen_tokens);
        set_max_cpu_isa(self.restore);
        times
    }
}

/// candle-transformers' `quantized_llama` on the same GGUF: the peer dynexec's decoder is
/// checked against.
pub struct CandlePeer {
    weights: candle_transformers::models::quantized_llama::ModelWeights,
    device: Device,
}

impl CandlePeer {
    /// Its row name.
    pub const NAME: &'static str = "candle-transformers quantized_llama";

    /// Loads the GGUF at `path` with candle-transformers.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut file)?;
        let weights = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
            content, &mut file, device,
        )?;
        Ok(Self {
            weights,
            device: device.clone(),
        })
    }
}

impl Contestant for CandlePeer {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn run(&mut self, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)> {
        let start = Instant::now();
        let input = Tensor::new(prompt, &self.device)?.unsqueeze(0)?;
        let logits = self.weights.forward(&input, 0)?.squeeze(0)?;
        let mut next = logits.argmax(0)?.to_scalar::<u32>()?;
        let prefill = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for i in 0..gen_tokens {
            let input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
            let logits = self.weights.forward(&input, prompt.len() + i)?.squeeze(0)?;
            next = logits.argmax(0)?.to_scalar::<u32>()?;
        }
        Ok((prefill, start.elapsed().as_secs_f64()))
    }
}

/// One contestant's speed.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The contestant's name.
    pub implementation: &'static str,
    /// Median prefill tokens/s.
    pub prefill_tokens_per_s: f64,
    /// Median decode tokens/s (0 without generated tokens).
    pub decode_tokens_per_s: f64,
    /// Prefill tokens/s over the measured runs.
    pub prefill: Summary,
    /// Decode tokens/s over the measured runs.
    pub decode: Summary,
    /// Prefill tokens/s of each measured run, in order (for llama-bench's `samples_ts`).
    #[serde(skip)]
    pub prefill_samples: Vec<f64>,
    /// Decode tokens/s of each measured run, in order.
    #[serde(skip)]
    pub decode_samples: Vec<f64>,
}

impl Row {
    /// `rows[0]`'s median over the row named `name`'s, by `measure`; `None` when that row is
    /// absent or measured zero.
    pub fn ratio(rows: &[Row], name: &str, measure: fn(&Row) -> f64) -> Option<f64> {
        let first = rows.first()?;
        let other = rows.iter().find(|r| r.implementation == name)?;
        (measure(other) > 0.0).then(|| measure(first) / measure(other))
    }
}

/// A summary of no samples (a decode-free run).
pub const NO_SAMPLES: Summary = Summary {
    median: 0.0,
    mean: 0.0,
    stddev: 0.0,
    min: 0.0,
    max: 0.0,
    runs: 0,
};

/// Times every contestant on `prompt` and `gen_tokens` greedy steps, `warmup + runs` rounds
/// interleaved; `on_run` hears each contestant's name before its run.
pub fn run_generation(
    contestants: &mut [Box<dyn Contestant + '_>],
    prompt: &[u32],
    gen_tokens: usize,
    warmup: usize,
    runs: usize,
    mut on_run: impl FnMut(&'static str),
) -> Result<Vec<Row>> {
    let times = interleave(contestants.len(), warmup, runs, |i| {
        on_run(contestants[i].name());
        contestants[i].run(prompt, gen_tokens)
    })?;
    Ok(contestants
        .iter()
        .zip(times)
        .map(|(contestant, times)| {
            let pp: Vec<f64> = times.iter().map(|t| prompt.len() as f64 / t.0).collect();
            let tg: Vec<f64> = match gen_tokens {
                0 => Vec::new(),
                n => times.iter().map(|t| n as f64 / t.1).collect(),
            };
            let prefill = Summary::of(&pp).unwrap_or(NO_SAMPLES);
            let decode = Summary::of(&tg).unwrap_or(NO_SAMPLES);
            Row {
                implementation: contestant.name(),
                prefill_tokens_per_s: prefill.median,
                decode_tokens_per_s: decode.median,
                prefill,
                decode,
                prefill_samples: pp,
                decode_samples: tg,
            }
        })
        .collect())
}

/// dynexec's medians over one llama.cpp build's.
#[derive(Debug, Clone, Serialize)]
pub struct LlamaCppRatio {
    /// The build's row name.
    pub implementation: &'static str,
    /// Prefill tokens/s ratio.
    pub prefill_ratio: f64,
    /// Decode tokens/s ratio; `None` without generated tokens.
    pub decode_ratio: Option<f64>,
}

/// dynexec's medians (the first row) over each peer's that ran.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Over candle-transformers', when it ran.
    pub prefill_ratio_vs_peer: Option<f64>,
    /// Over candle-transformers', decode.
    pub decode_ratio_vs_peer: Option<f64>,
    /// Over the first llama.cpp build's.
    pub prefill_ratio_vs_llama_cpp: Option<f64>,
    /// Over the first llama.cpp build's, decode.
    pub decode_ratio_vs_llama_cpp: Option<f64>,
    /// Over every llama.cpp build's, in order.
    pub llama_cpp_ratios: Vec<LlamaCppRatio>,
    /// Over dynexec's own held to a lower instruction set.
    pub prefill_ratio_vs_cpu_isa: Option<f64>,
    /// Over dynexec's own held to a lower instruction set, decode.
    pub decode_ratio_vs_cpu_isa: Option<f64>,
}

impl Ratios {
    /// The ratios of `rows[0]` to the peers among `rows`: the llama.cpp builds named
    /// `llama_cpp`, dynexec held to `isa`.
    pub fn of(rows: &[Row], llama_cpp: &[&'static str], isa: Option<Isa>) -> Self {
        let prefill = |name: &str| Row::ratio(rows, name, |r| r.prefill_tokens_per_s);
        let decode = |name: &str| Row::ratio(rows, name, |r| r.decode_tokens_per_s);
        let isa_row = isa.map_or("", HeldToIsa::name_on);
        Self {
            prefill_ratio_vs_peer: prefill(CandlePeer::NAME),
            decode_ratio_vs_peer: decode(CandlePeer::NAME),
            prefill_ratio_vs_llama_cpp: prefill(llama_cpp::LLAMA_CPP_NAME),
            decode_ratio_vs_llama_cpp: decode(llama_cpp::LLAMA_CPP_NAME),
            llama_cpp_ratios: llama_cpp
                .iter()
                .filter_map(|&name| {
                    Some(LlamaCppRatio {
                        implementation: name,
                        prefill_ratio: prefill(name)?,
                        decode_ratio: decode(name),
                    })
                })
                .collect(),
            prefill_ratio_vs_cpu_isa: prefill(isa_row),
            decode_ratio_vs_cpu_isa: decode(isa_row),
        }
    }
}
