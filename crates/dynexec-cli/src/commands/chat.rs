//! `dynexec chat`: an interactive conversation that keeps its KV cache between turns.

use super::common::{ModelArgs, SamplingArgs};
use crate::options::GlobalOptions;
use anyhow::Result;
use clap::Args;
use dynexec_engine::chat::{ChatSession, TurnEnd, TurnReport};
use dynexec_models::generation::GenerateOptions;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Args)]
#[command(
    after_help = "Commands inside the chat:\n  /reset          forget the conversation (the system prompt stays)\n  /system TEXT    replace the system prompt and start over (/system alone removes it)\n  /exit           leave (so does Ctrl-D)\nCtrl-C stops the answer being written, not the program.\n\nExample:\n  dynexec chat -m qwen2.5-coder-1.5b-instruct --system \"You are a terse assistant.\""
)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// System prompt leading the conversation (llama-cli's `-sys`).
    #[arg(long, alias = "system-prompt", value_name = "TEXT")]
    pub system: Option<String>,

    /// Most tokens per answer.
    #[arg(long, short = 'n', alias = "n-predict", default_value_t = 512)]
    pub max_tokens: usize,

    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Set by Ctrl-C; the answer being written stops at its next token.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C stops the answer instead of the program (on Unix; elsewhere it ends the program).
fn catch_interrupts() {
    #[cfg(unix)]
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// A line the user typed: a message or one of the commands.
enum Input<'a> {
    Message(&'a str),
    Reset,
    System(Option<&'a str>),
    Exit,
    Help,
    Unknown(&'a str),
}

fn parse_input(line: &str) -> Input<'_> {
    let line = line.trim();
    let Some(command) = line.strip_prefix('/') else {
        return Input::Message(line);
    };
    let (name, rest) = command
        .split_once(char::is_whitespace)
        .unwrap_or((command, ""));
    let rest = rest.trim();
    match name {
        "exit" | "quit" | "bye" => Input::Exit,
        "reset" | "clear" => Input::Reset,
        "system" => Input::System((!rest.is_empty()).then_some(rest)),
        "help" | "?" => Input::Help,
        _ => Input::Unknown(name),
    }
}

pub fn run(global: &GlobalOptions, args: ChatArgs) -> Result<()> {
    let loaded = args.model.load(global)?;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params(),
        stop_at_eos: true,
    };
    // Bad sampling settings are refused now, not at the first message.
    dynexec_core::sampling::Sampler::new(options.sampling.clone())?;
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1");
    let mut session = ChatSession::new(&loaded.model, &loaded.tokenizer, args.system.clone());
    session.check_template()?;
    catch_interrupts();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    if !global.quiet {
        eprintln!(
            "dynexec chat: `{}` | /reset, /system TEXT, /exit; Ctrl-C stops an answer",
            args.model.model
        );
    }
    let mut line = String::new();
    loop {
        write!(out, "> ")?;
        out.flush()?;
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            writeln!(out)?;
            return Ok(());
        }
        match parse_input(&line) {
            Input::Exit => return Ok(()),
            Input::Message("") => continue,
            Input::Reset => {
                session.reset();
                eprintln!("(conversation forgotten)");
            }
            Input::System(text) => {
                session.set_system(text.map(str::to_string));
                eprintln!(
                    "(system prompt {}; conversation forgotten)",
                    if text.is_some() { "set" } else { "removed" }
                );
            }
            Input::Help => eprintln!(
                "/reset forgets the conversation, /system TEXT replaces the system prompt, /exit leaves; Ctrl-C stops an answer"
            ),
            Input::Unknown(name) => {
                eprintln!("unknown command /{name}: use /reset, /system TEXT, /exit or /help")
            }
            Input::Message(text) => {
                INTERRUPTED.store(false, Ordering::Relaxed);
                let report = session.turn(text, &options, &INTERRUPTED, |piece| {
                    write!(out, "{piece}")
                        .and_then(|()| out.flush())
                        .map_err(|e| dynexec_core::Error::io("standard output", e))
                });
                writeln!(out)?;
                match report {
                    Ok(report) if !global.quiet => eprintln!("{}", describe(&report)),
                    Ok(_) => {}
                    // The conversation is intact: a turn that cannot run is left out.
                    Err(e @ dynexec_core::Error::ContextOverflow { .. }) => eprintln!(
                        "{e}; /reset to start over"
                    ),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// The turn's line under its answer: what was reused, prefilled and generated, and how fast.
fn describe(report: &TurnReport) -> String {
    let rate = if report.decode_secs > 0.0 {
        report.generated_tokens.saturating_sub(1) as f64 / report.decode_secs
    } else {
        0.0
    };
    let end = match report.end {
        TurnEnd::EndOfTurn => "",
        TurnEnd::MaxTokens => " | stopped at --max-tokens",
        TurnEnd::ContextFull => " | the context is full: /reset to start over",
        TurnEnd::Interrupted => " | interrupted",
    };
    format!(
        "[prompt {} tokens: {} reused, {} prefilled in {:.0} ms | {} tokens at {:.1} tok/s{end}]",
        report.prompt_tokens,
        report.reused_tokens,
        report.prefilled_tokens,
        report.prefill_secs * 1000.0,
        report.generated_tokens,
        rate
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_messages_are_told_apart() {
        assert!(matches!(
            parse_input("hello /there\n"),
            Input::Message("hello /there")
        ));
        assert!(matches!(parse_input("/exit\n"), Input::Exit));
        assert!(matches!(
            parse_input("  /system Be brief. \n"),
            Input::System(Some("Be brief."))
        ));
        assert!(matches!(parse_input("/system"), Input::System(None)));
        assert!(matches!(parse_input("/reset"), Input::Reset));
        assert!(matches!(
            parse_input("/frobnicate x"),
            Input::Unknown("frobnicate")
        ));
    }
}
