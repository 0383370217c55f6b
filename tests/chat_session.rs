//! A multi-turn conversation on SmolLM2 that keeps its KV cache: each turn after the first
//! prefills only its new tokens and answers exactly as a conversation that recomputes
//! everything does.

mod common;

use candle_core::Device;
use dynexec_engine::chat::{ChatSession, TurnEnd};
use dynexec_models::generation::GenerateOptions;
use dynexec_models::llama::load_decoder;
use std::sync::atomic::AtomicBool;

#[test]
fn turns_reuse_the_cache_and_answer_as_cold_turns_do() {
    let loaded = load_decoder(&common::smollm2_files(), None, None, &Device::Cpu).unwrap();
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);
    let system = Some("You are a helpful assistant.".to_string());
    let options = GenerateOptions::greedy(24);
    let go_on = AtomicBool::new(false);
    let mut warm = ChatSession::new(model, tokenizer, system.clone());
    let mut cold = ChatSession::new(model, tokenizer, system);
    let questions = [
        "My name is Ada. Say hello.",
        "What is my name?",
        "Spell it backwards.",
    ];
    let mut previous = None;
    for (turn, question) in questions.iter().enumerate() {
        let mut streamed = String::new();
        let w = warm
            .turn(question, &options, &go_on, |t| {
                streamed.push_str(t);
                Ok(())
            })
            .unwrap();
        cold.forget_cache();
        let c = cold.turn(question, &options, &go_on, |_| Ok(())).unwrap();
        let answer = &warm.messages().last().unwrap().content;
        assert_eq!(
            answer,
            &cold.messages().last().unwrap().content,
            "turn {turn}"
        );
        assert_eq!(&streamed, answer);
        assert_eq!((c.reused_tokens, c.prefilled_tokens), (0, c.prompt_tokens));
        assert_eq!(w.prompt_tokens, c.prompt_tokens);
        assert_eq!(w.prefilled_tokens, w.prompt_tokens - w.reused_tokens);
        if let Some((prompt, generated)) = previous {
            // All of the last prompt and nearly all of its answer are reused: only the new
            // turn (and the template's few tokens closing the last answer) is prefilled.
            assert!(
                w.reused_tokens + 2 >= prompt + generated,
                "turn {turn}: {w:?}"
            );
            assert!(w.prefilled_tokens < 20, "turn {turn}: {w:?}");
        }
        previous = Some((w.prompt_tokens, w.generated_tokens));
    }
    assert_eq!(warm.messages().len(), 6);
    // A turn asked to stop answers with what it has.
    let stop = AtomicBool::new(true);
    let r = warm
        .turn("Count to fifty.", &options, &stop, |_| Ok(()))
        .unwrap();
    assert_eq!((r.end, r.generated_tokens), (TurnEnd::Interrupted, 1));
}
