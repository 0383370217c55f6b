//! `dynexec`: the command-line interface over dynexec's engines.
//!
//! Results go to stdout (text, or one JSON object with `--json`); progress and diagnostics go
//! to stderr.

mod commands;
mod options;

use clap::{Parser, Subcommand};
use options::GlobalOptions;

/// Dynamic-execution inference runtime: spend on each input only the compute it needs.
#[derive(Parser)]
#[command(name = "dynexec", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with a decoder model, streaming it to stdout.
    Generate(commands::generate::GenerateArgs),
    /// Classify sentences or images with an early-exit model: each input stops at the layer
    /// its exit policy allows.
    #[command(
        after_help = "Examples:\n  dynexec classify --model minilm-l6-reviews \"A gorgeous, witty, seductive movie.\"\n  dynexec classify --model minilm-l6-reviews --policy confidence:0.9 --file reviews.txt --json\n  dynexec classify --model cnn-fashion-mnist shoe.png"
    )]
    Classify(commands::classify::ClassifyArgs),
    /// Train early-exit heads and calibrate their thresholds.
    #[command(subcommand)]
    Exits(commands::exits::ExitsCommand),
    /// Text to image with an adaptive number of denoising steps: fixed, predicted from the
    /// prompt, or stopped once the image has converged.
    #[command(
        after_help = "Examples:\n  dynexec diffuse --prompt \"a pair of jeans\" --steps predicted --n 4 --out jeans.png\n  dynexec diffuse --prompt \"an ankle boot\" --steps converge:0.01 --json\n  dynexec diffuse --model sd-turbo --prompt \"a red bicycle\" --steps 1   (Stable Diffusion from the hub)"
    )]
    Diffuse(commands::diffuse::DiffuseArgs),
    /// Train the diffusion model and its step predictor.
    #[command(subcommand)]
    Diffusion(commands::diffusion::DiffusionCommand),
    /// Benchmark an engine: baseline and technique side by side in one process.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
    /// Serve a decoder over HTTP with OpenAI's API (chat and text completions, streaming),
    /// batching concurrent requests; requests choose speculative decoding or early exit.
    Serve(commands::serve::ServeArgs),
    /// Prepare speculative decoding: rank tokens for a draft vocabulary (FR-Spec), train a
    /// lookahead classifier (DISCO).
    #[command(subcommand)]
    Spec(commands::spec::SpecCommand),
    /// Convert a model's linear layers (f32, f16, q8_0, q4_0, q4_1) and write a GGUF.
    Quantize(commands::quantize::QuantizeArgs),
    /// Measure model quality (perplexity).
    #[command(subcommand)]
    Eval(commands::eval::EvalCommand),
    /// Look inside a model: compare the dynamics (DSA) and geometry (Procrustes, CKA, RSA) of
    /// its layers' hidden states, across precisions, prompts or models; or of any two arrays.
    Analyze(commands::analyze::AnalyzeArgs),
    /// List, pull and locate the models of the manifest.
    #[command(subcommand)]
    Models(commands::models::ModelsCommand),
    /// Talk with a decoder: a multi-turn conversation in the terminal that keeps its KV cache
    /// between turns, so each turn prefills only what is new.
    Chat(commands::chat::ChatArgs),
    /// List, pull and locate the data sets the tests, training commands and benchmarks read.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
}

/// llama.cpp's multi-letter single-dash flags, which clap cannot declare, as the long flags
/// they mean here.
const LLAMA_CPP_FLAGS: &[(&str, &str)] = &[
    ("-md", "--model-draft"),
    ("-np", "--parallel"),
    ("-sys", "--system"),
];

/// llama.cpp's hub flags (`-hf ORG/REPO[:QUANT]`) and the model flag each stands for: the
/// value becomes the model reference `hf:ORG/REPO:QUANT`.
const LLAMA_CPP_HUB_FLAGS: &[(&str, &str)] = &[
    ("-hf", "--model"),
    ("-hfr", "--model"),
    ("--hf-repo", "--model"),
    ("-hfd", "--model-draft"),
    ("-hfrd", "--model-draft"),
    ("--hf-repo-draft", "--model-draft"),
];

/// The quantization llama.cpp's `-hf` asks for when the reference names none (where a repo
/// lacks it, llama.cpp falls back to another file; dynexec refuses, listing the ones it has).
const LLAMA_CPP_DEFAULT_QUANT: &str = "Q4_K_M";

/// `ORG/REPO[:QUANT]` as a model reference, `hf:ORG/REPO:QUANT` (Q4_K_M by default).
fn hub_reference(value: &str) -> String {
    if value.contains(':') {
        format!("hf:{value}")
    } else {
        format!("hf:{value}:{LLAMA_CPP_DEFAULT_QUANT}")
    }
}

/// The command line with llama.cpp's spellings rewritten ([`LLAMA_CPP_FLAGS`],
/// [`LLAMA_CPP_HUB_FLAGS`]).
fn llama_cpp_spellings(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let text = arg.to_str().unwrap_or_default();
        if let Some((_, long)) = LLAMA_CPP_FLAGS.iter().find(|(short, _)| *short == text) {
            out.push(long.into());
            continue;
        }
        let (flag, inline) = match text.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_string())),
            None => (text, None),
        };
        match LLAMA_CPP_HUB_FLAGS.iter().find(|(hub, _)| *hub == flag) {
            Some((_, model_flag)) => {
                out.push(model_flag.into());
                // A missing value is left for clap to report against the model flag, and a
                // value that is not text goes on as it is, for clap to refuse.
                if let Some(value) = inline.map(std::ffi::OsString::from).or_else(|| args.next()) {
                    out.push(match value.to_str() {
                        Some(text) => hub_reference(text).into(),
                        None => value,
                    });
                }
            }
            None => out.push(arg),
        }
    }
    out
}

/// glibc hands every buffer over 128 KiB back to the kernel when it is freed, so each tensor
/// of a training step (a few MiB each, thousands per step) arrives as fresh zeroed pages and
/// page faults. Keeping buffers up to 32 MiB in the heap, and the heap's free memory up to
/// 1 GiB, lets the next step reuse them (measured on MiniLM joint training with candle's
/// composed ops: 26.9 s to 19.9 s; with the fused ops the gain is within this machine's noise).
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() {
    keep_freed_buffers();
    let cli = Cli::parse_from(llama_cpp_spellings(std::env::args_os()));
    cli.global.apply_process_settings();
    let result = match cli.command {
        Command::Generate(args) => commands::generate::run(&cli.global, args),
        Command::Bench(cmd) => commands::bench::run(&cli.global, cmd),
        Command::Classify(args) => commands::classify::run(&cli.global, args),
        Command::Exits(cmd) => commands::exits::run(&cli.global, cmd),
        Command::Diffusion(cmd) => commands::diffusion::run(&cli.global, cmd),
        Command::Diffuse(args) => commands::diffuse::run(&cli.global, args),
        Command::Models(cmd) => commands::models::run(&cli.global, cmd),
        Command::Data(cmd) => commands::data::run(&cli.global, cmd),
        Command::Chat(args) => commands::chat::run(&cli.global, args),
        Command::Serve(args) => commands::serve::run(&cli.global, args),
        Command::Spec(cmd) => commands::spec::run(&cli.global, cmd),
        Command::Quantize(args) => commands::quantize::run(&cli.global, args),
        Command::Eval(cmd) => commands::eval::run(&cli.global, cmd),
        Command::Analyze(args) => commands::analyze::run(&cli.global, args),
    };
    if let Err(err) = result {
        eprintln!("error: {}", options::error_message(&err));
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Cli {
        let args = line.split_whitespace().map(std::ffi::OsString::from);
        Cli::try_parse_from(llama_cpp_spellings(args)).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// llama.cpp's, mistral.rs's and vLLM's spellings parse to the same options as ours.
    #[test]
    fn peer_spellings_parse_to_the_same_options() {
        let generate = |line: &str| match parse(line) {
            Cli {
                global,
                command: Command::Generate(args),
            } => (
                global.threads,
                args.model.ctx_size,
                args.model.model,
                args.max_tokens,
                args.sampling.temperature,
                args.sampling.seed,
                args.draft,
            ),
            _ => panic!("not generate"),
        };
        assert_eq!(
            generate("dynexec -t 2 generate -m qwen -c 512 -n 9 --temp 0.5 -s 7 -md small"),
            generate(
                "dynexec --threads 2 generate --model qwen --ctx-size 512 --max-tokens 9 --temperature 0.5 --seed 7 --draft small"
            )
        );
        assert_eq!(
            generate("dynexec generate --n-predict 9 --model-draft small").3,
            9
        );
        let serve = |line: &str| match parse(line) {
            Cli {
                command: Command::Serve(args),
                ..
            } => (
                args.model_flag.unwrap_or(args.model),
                args.served_name,
                args.max_batch,
                args.draft,
                args.batch_size,
                args.ctx_size,
            ),
            _ => panic!("not serve"),
        };
        let ours = serve(
            "dynexec serve qwen --served-name coder --max-batch 4 --draft small --batch-size 512 --ctx-size 4096",
        );
        for line in [
            "dynexec serve -m qwen -a coder -np 4 -md small -b 512 -c 4096",
            "dynexec serve --model qwen --alias coder --parallel 4 --model-draft small --max-num-batched-tokens 512 -c 4096",
            "dynexec serve --model qwen --served-model-name coder --parallel 4 --draft small -b 512 --ctx-size 4096",
        ] {
            assert_eq!(serve(line), ours, "{line}");
        }
    }

    /// llama.cpp's `--draft-max/--draft-min` bound any lookahead, appended to its spec.
    #[test]
    fn draft_bounds_append_to_the_lookahead() {
        match parse(
            "dynexec generate -md small --lookahead confidence:0.5 --draft-max 16 --draft-min 2",
        ) {
            Cli {
                command: Command::Generate(args),
                ..
            } => assert_eq!(
                args.draft_bounds.apply(&args.lookahead),
                "confidence:0.5,min=2,max=16"
            ),
            _ => panic!("not generate"),
        }
        let lone = llama_cpp_spellings(
            ["dynexec", "generate", "--draft-max", "4"]
                .map(Into::into)
                .into_iter(),
        );
        assert!(
            Cli::try_parse_from(lone).is_err(),
            "bounds without a draft are refused"
        );
    }

    /// llama-cli's `-sys` is the chat's system prompt.
    #[test]
    fn chat_takes_llama_cli_spellings() {
        match parse("dynexec chat -m qwen -sys terse -n 64 --temp 0.2") {
            Cli {
                command: Command::Chat(args),
                ..
            } => assert_eq!(
                (
                    args.model.model.as_str(),
                    args.system.as_deref(),
                    args.max_tokens
                ),
                ("qwen", Some("terse"), 64)
            ),
            _ => panic!("not chat"),
        }
    }

    /// `-hf ORG/REPO[:QUANT]` names the GGUF of that quantization (Q4_K_M by default), for
    /// the model and, with `-hfd`, the draft; which file that is, the hub crate's tests check.
    #[test]
    fn hub_flags_become_quantization_references() {
        let models = |line: &str| match parse(line) {
            Cli {
                command: Command::Generate(args),
                ..
            } => (args.model.model, args.draft),
            _ => panic!("not generate"),
        };
        assert_eq!(
            models("dynexec generate -hf Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF -hfd Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF:q8_0"),
            (
                "hf:Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF:Q4_K_M".to_string(),
                Some("hf:Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF:q8_0".to_string())
            )
        );
        assert_eq!(
            models("dynexec generate --hf-repo=org/m-GGUF:Q8_0").0,
            "hf:org/m-GGUF:Q8_0"
        );
        match parse("dynexec serve -hf org/m-GGUF") {
            Cli {
                command: Command::Serve(args),
                ..
            } => assert_eq!(args.model_flag.as_deref(), Some("hf:org/m-GGUF:Q4_K_M")),
            _ => panic!("not serve"),
        }
    }
}
