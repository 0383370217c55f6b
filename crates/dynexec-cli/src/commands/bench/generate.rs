//! `dynexec bench generate`: prefill and decode speed of dynexec next to its peers.

use crate::commands::common::ModelArgs;
use crate::options::{print_json, progress_bar, GlobalOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use dynexec_core::device::device_name;
use dynexec_engine::bench::llama_cpp::{build_names, LlamaCpp, LLAMA_CPP_NAME};
use dynexec_engine::bench::records::{records, render, rfc3339, Format, RunInfo};
use dynexec_engine::bench::{
    bench_prompt, run_generation, CandlePeer, Contestant, Greedy, HeldToIsa, Ratios, Row,
};
use dynexec_models::cpu_kernels::{cpu_isa, Isa};
use dynexec_models::linear::CpuKernels;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement (like llama-bench's pp).
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Tokens to decode after the prompt (like llama-bench's tg).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Measured runs per implementation.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Unmeasured runs first, to warm caches and thread pools.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Also run candle-transformers' quantized_llama on the same GGUF (the peer the decoder
    /// is checked against), interleaved run by run.
    #[arg(long)]
    peer: bool,
    /// Also run llama.cpp's `llama-bench` (give the binary's path) on the same GGUF with the
    /// same thread count, prompt and generation lengths, interleaved run by run, and print
    /// dynexec's ratio to it. Repeat it to compare several builds in one run (say, AVX2 and
    /// AVX-512); each is named by its CMake build folder.
    #[arg(long, value_name = "LLAMA_BENCH")]
    compare_llama_cpp: Vec<PathBuf>,
    /// Also run dynexec with its repacked kernels held to this instruction set (`avx2`),
    /// interleaved run by run: what the better one this CPU has is worth.
    #[arg(long, value_name = "ISA")]
    compare_cpu_isa: Option<Isa>,
    /// Print llama-bench's records instead of the table: `json`, `jsonl`, `csv` or `md`, with
    /// llama-bench's field names (`model_type`, `n_threads`, `n_prompt`, `n_gen`, `avg_ts`,
    /// `stddev_ts`, `samples_ts`, ...) beside dynexec's (`implementation`, `test`,
    /// `median_ts`), a record per implementation and test (llama-bench's `-o`).
    #[arg(long, short = 'o', value_name = "FORMAT")]
    output: Option<Format>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    format: &'static str,
    device: String,
    /// The instruction set of dynexec's repacked CPU kernels (none: they did not run).
    cpu_isa: Option<&'static str>,
    threads: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    runs: usize,
    warmup: usize,
    rows: Vec<Row>,
    #[serde(flatten)]
    ratios: Ratios,
}

pub fn run(global: &GlobalOptions, args: BenchGenerateArgs) -> Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(args.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    let loaded = args.model.load(global)?;
    let model = &loaded.model;
    let context = model.config().context_length;
    anyhow::ensure!(
        args.prompt_tokens + args.gen_tokens <= context,
        "--prompt-tokens + --gen-tokens = {} exceeds the model's context of {context}",
        args.prompt_tokens + args.gen_tokens
    );
    let prompt = bench_prompt(&loaded.tokenizer, args.prompt_tokens)?;

    let mut decoders: Vec<Box<dyn Contestant + '_>> = vec![Box::new(Greedy(model))];
    if let Some(isa) = args.compare_cpu_isa {
        if Isa::detect().is_none_or(|best| isa > best) {
            bail!(
                "--compare-cpu-isa {}: this CPU cannot run dynexec's kernels on it (it runs {})",
                isa.name(),
                Isa::detect().map_or("none of them", Isa::name)
            );
        }
        decoders.push(Box::new(HeldToIsa {
            model,
            isa,
            restore: global.max_cpu_isa,
        }));
    }
    if args.peer {
        let files = global.hub()?.resolve(&args.model.model)?;
        let gguf = files
            .find(".gguf")
            .context("--peer compares on a GGUF model; this model has no .gguf file")?;
        decoders.push(Box::new(CandlePeer::load(gguf, model.device())?));
    }

    // Named once: the rows and their ratios refer to the same names.
    let llama_cpp_names = build_names(&args.compare_llama_cpp);
    if !args.compare_llama_cpp.is_empty() {
        if global.quant.is_some() {
            bail!("--compare-llama-cpp runs llama.cpp on the GGUF file as stored, so dynexec must run it as stored too: drop --quant, or write the converted model with `dynexec quantize --to FORMAT --out FILE.gguf` and bench that file on both");
        }
        let files = global.hub()?.resolve(&args.model.model)?;
        let gguf = files
            .find(".gguf")
            .context("--compare-llama-cpp needs a GGUF model; this model has no .gguf file")?;
        for (binary, &name) in args.compare_llama_cpp.iter().zip(&llama_cpp_names) {
            decoders.push(Box::new(
                LlamaCpp::new(name, binary, gguf, candle_core::utils::get_num_threads())
                    .context("--compare-llama-cpp")?,
            ));
        }
    }

    let total = ((args.warmup + args.runs) * decoders.len()) as u64;
    let bar = progress_bar(global, total, "bench [{bar:30}] {pos}/{len} runs {msg}");
    let rows = run_generation(
        &mut decoders,
        &prompt,
        args.gen_tokens,
        args.warmup,
        args.runs,
        |name| {
            bar.set_message(name);
            bar.inc(1);
        },
    )?;
    bar.finish_and_clear();
    let report = Report {
        model: args.model.model.clone(),
        format: loaded.format,
        device: device_name(model.device()),
        cpu_isa: (model.device().is_cpu() && global.cpu_kernels == CpuKernels::Dynexec)
            .then(cpu_isa)
            .flatten()
            .map(Isa::name),
        threads: candle_core::utils::get_num_threads(),
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        runs: args.runs,
        warmup: args.warmup,
        ratios: Ratios::of(&rows, &llama_cpp_names, args.compare_cpu_isa),
        rows,
    };
    if let Some(format) = args.output {
        anyhow::ensure!(
            !global.json,
            "--json and -o both choose the output: keep one (-o json writes llama-bench's records)"
        );
        let run = run_info(global, &args, model, loaded.format)?;
        let records = records(&report.rows, &run, args.prompt_tokens, args.gen_tokens);
        print!("{}", render(&records, format)?);
        return Ok(());
    }
    if global.json {
        return print_json(&report);
    }
    println!(
        "model {} ({}) | device {}{} | threads {} | pp{} tg{} | {} runs + {} warm-up",
        report.model,
        report.format,
        report.device,
        report
            .cpu_isa
            .map(|isa| format!(" ({isa} kernels)"))
            .unwrap_or_default(),
        report.threads,
        report.prompt_tokens,
        report.gen_tokens,
        report.runs,
        report.warmup
    );
    println!(
        "{:<42} {:>22} {:>22}",
        "implementation", "prefill tok/s", "decode tok/s"
    );
    for row in &report.rows {
        println!(
            "{:<42} {:>22} {:>22}",
            row.implementation,
            format!("{:.1} ± {:.1}", row.prefill.median, row.prefill.stddev),
            format!("{:.1} ± {:.1}", row.decode.median, row.decode.stddev)
        );
    }
    let llama_cpp_rows = report.ratios.llama_cpp_ratios.iter().map(|r| {
        let name = match r.implementation {
            LLAMA_CPP_NAME => "llama.cpp",
            build => build,
        };
        (
            format!("ratio dynexec / {name}"),
            Some(r.prefill_ratio),
            r.decode_ratio,
        )
    });
    let ratio_rows = [(
        "ratio dynexec / peer".to_string(),
        report.ratios.prefill_ratio_vs_peer,
        report.ratios.decode_ratio_vs_peer,
    )]
    .into_iter()
    .chain(llama_cpp_rows)
    .chain([(
        "ratio dynexec / its --compare-cpu-isa".to_string(),
        report.ratios.prefill_ratio_vs_cpu_isa,
        report.ratios.decode_ratio_vs_cpu_isa,
    )]);
    for (name, prefill, decode) in ratio_rows {
        if let (Some(p), Some(d)) = (prefill, decode) {
            println!(
                "{:<42} {:>22} {:>22}",
                name,
                format!("{p:.2}x"),
                format!("{d:.2}x")
            );
        }
    }
    Ok(())
}

/// The model and machine facts llama-bench records carry.
fn run_info(
    global: &GlobalOptions,
    args: &BenchGenerateArgs,
    model: &dynexec_models::llama::Llama,
    format: &str,
) -> Result<RunInfo> {
    let files = global.hub()?.resolve(&args.model.model)?;
    let weights = files
        .find(".gguf")
        .or(files.files.first().map(PathBuf::as_path));
    // The weights alone, as llama-bench counts them (not config or tokenizer files).
    let model_size = files
        .files
        .iter()
        .filter(|f| {
            f.extension()
                .is_some_and(|e| e == "gguf" || e == "safetensors")
        })
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let config = model.config();
    let n_params = config.parameter_count();
    let device = model.device();
    let backend = match device {
        candle_core::Device::Cpu => "CPU",
        candle_core::Device::Cuda(_) => "CUDA",
        candle_core::Device::Metal(_) => "Metal",
    };
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let kv_type = format!("{:?}", model.dtype()).to_lowercase();
    Ok(RunInfo {
        build_commit: format!("dynexec {}", env!("CARGO_PKG_VERSION")),
        cpu_info: cpu_model_name(),
        gpu_info: if device.is_cpu() {
            String::new()
        } else {
            device_name(device)
        },
        backends: backend.to_string(),
        model_filename: weights.map(|p| p.display().to_string()).unwrap_or_default(),
        model_type: format!(
            "{} {:.1}B {format}",
            weights
                .and_then(gguf_architecture)
                .unwrap_or_else(|| "llama".to_string()),
            n_params as f64 / 1e9
        ),
        model_size,
        model_n_params: n_params,
        n_batch: args.prompt_tokens,
        n_threads: candle_core::utils::get_num_threads(),
        type_k: kv_type.clone(),
        type_v: kv_type,
        test_time: rfc3339(secs),
    })
}

/// The CPU's model name (Linux's /proc/cpuinfo), else the architecture.
fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_string())
            })
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// A GGUF's `general.architecture` (`qwen2`, `llama`), read from its header alone.
fn gguf_architecture(path: &std::path::Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).ok()?;
    content
        .metadata
        .get("general.architecture")?
        .to_string()
        .ok()
        .cloned()
}
