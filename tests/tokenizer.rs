//! The tokenizer rebuilt from SmolLM2's GGUF must encode as the model's own HF tokenizer.

mod common;

use candle_core::quantized::gguf_file;
use common::smollm2_gguf;
use dynexec_core::tokenizer::{TextTokenizer, TokenStream};

fn smollm2_tokenizer() -> TextTokenizer {
    let mut file = std::fs::File::open(smollm2_gguf()).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    TextTokenizer::from_gguf(&content).unwrap()
}

#[test]
fn chat_prompt_encodes_exactly_as_the_reference() {
    // Reference ids from llama.cpp's llama-tokenize on the same GGUF (which matches the HF
    // tokenizer of SmolLM2-135M-Instruct).
    let tok = smollm2_tokenizer();
    let ids = tok
        .encode(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        )
        .unwrap();
    assert_eq!(
        ids,
        vec![1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    );
}

#[test]
fn plain_prompts_get_no_bos_and_no_prefix_space() {
    let tok = smollm2_tokenizer();
    let ids = tok.encode("Hello world").unwrap();
    assert_ne!(ids[0], 1, "SmolLM2's GGUF sets add_bos_token = false");
    assert_eq!(
        tok.decode(&ids[..1]).unwrap(),
        "Hello",
        "no prefix space may be added"
    );
    assert_eq!(tok.decode(&ids).unwrap(), "Hello world");
}

#[test]
fn digits_are_split_one_by_one() {
    let tok = smollm2_tokenizer();
    let ids = tok.encode("2024").unwrap();
    assert_eq!(ids.len(), 4);
    let pieces: Vec<String> = ids.iter().map(|&i| tok.decode(&[i]).unwrap()).collect();
    assert_eq!(pieces, vec!["2", "0", "2", "4"]);
}

#[test]
fn text_round_trips_including_multibyte_characters() {
    let tok = smollm2_tokenizer();
    for text in [
        "naïve café, 東京 and emoji 🦀!",
        "  leading spaces\tand\nnewlines",
        "x=3.14159; y = x**2",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        // Streaming yields the same text piece by piece, never splitting a character.
        let mut stream = TokenStream::new(&tok);
        let mut streamed = String::new();
        for id in ids {
            if let Some(piece) = stream.push(id).unwrap() {
                streamed.push_str(&piece);
            }
        }
        if let Some(rest) = stream.finish().unwrap() {
            streamed.push_str(&rest);
        }
        assert_eq!(streamed, text);
    }
}

#[test]
fn chat_template_and_special_ids_come_from_the_metadata() {
    let tok = smollm2_tokenizer();
    assert!(tok.is_eos(2), "<|im_end|> ends a turn");
    let prompt = tok.chat_prompt(None, "Hi").unwrap();
    assert!(prompt.starts_with("<|im_start|>system\n"), "{prompt}");
    assert!(
        prompt.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{prompt}"
    );
}

fn gguf_tokenizer(path: &std::path::Path) -> TextTokenizer {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    TextTokenizer::from_gguf(&content).unwrap()
}

/// Code, whitespace runs, tabs and CRLF, digits, CJK, emoji with ZWJ sequences, contractions,
/// several scripts and special tokens, each encoded exactly as llama.cpp's `llama-tokenize`
/// encodes it on the same file (`tests/data/tokenizer/qwen2.5-coder.json`, made with
/// `scripts/tokenizer-reference.py`).
#[test]
fn qwen2_tokenizer_matches_llama_cpp_on_both_models() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/tokenizer/qwen2.5-coder.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for model in ["qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"] {
        let tok = gguf_tokenizer(&common::manifest_gguf(model));
        assert!(tok.is_eos(151645), "{model}: <|im_end|> ends a turn");
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let expected: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let ids = tok.encode(text).unwrap();
            assert_eq!(ids, expected, "{model}: {text:?}");
            // Without specials in the text, decoding gives the text back.
            if !text.contains("<|") {
                assert_eq!(tok.decode(&ids).unwrap(), text, "{model}");
            }
        }
    }
}
