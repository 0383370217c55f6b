//! Chat templates rendered with minijinja must equal Python jinja2's rendering, in the
//! environment transformers uses, of the same template (`tests/data/chat-templates/*.json`,
//! made with `scripts/chat-template-reference.py`), for system prompts, multi-turn
//! conversations, with and without the generation prompt.

mod common;

use candle_core::quantized::gguf_file;
use dynexec_core::tokenizer::{ChatMessage, ChatTemplate, TextTokenizer};

const MODELS: [&str; 3] = [
    "smollm2-135m-instruct",
    "qwen2.5-coder-1.5b-instruct",
    "qwen2.5-coder-0.5b-instruct",
];

fn reference(model: &str) -> serde_json::Value {
    let path = format!(
        "{}/tests/data/chat-templates/{model}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn messages(case: &serde_json::Value) -> Vec<ChatMessage> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

#[test]
fn templates_render_as_jinja2_renders_them() {
    for model in MODELS {
        let r = reference(model);
        let template = ChatTemplate::new(
            r["template"].as_str().unwrap(),
            r["bos_token"].as_str().unwrap(),
            r["eos_token"].as_str().unwrap(),
            model,
        );
        template.check().unwrap();
        let cases = r["cases"].as_array().unwrap();
        assert!(cases.len() >= 5);
        for case in cases {
            let add = case["add_generation_prompt"].as_bool().unwrap();
            let ours = template.render(&messages(case), add).unwrap();
            assert_eq!(ours, case["text"].as_str().unwrap(), "{model}: {case}");
        }
    }
}

/// The committed templates are the ones in the files, and the tokenizer renders with them.
#[test]
fn the_tokenizer_renders_the_gguf_template() {
    for model in MODELS {
        let r = reference(model);
        let mut file = std::fs::File::open(common::manifest_gguf(model)).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let tok = TextTokenizer::from_gguf(&content).unwrap();
        assert_eq!(
            tok.chat_template_source.as_deref(),
            r["template"].as_str(),
            "{model}"
        );
        for case in r["cases"].as_array().unwrap() {
            if case["add_generation_prompt"].as_bool().unwrap() {
                let ours = tok.chat_messages(&messages(case)).unwrap();
                assert_eq!(ours, case["text"].as_str().unwrap(), "{model}");
            }
        }
    }
}

#[test]
fn a_template_that_raises_is_a_clear_error() {
    let mut file = std::fs::File::open(common::smollm2_gguf()).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tok = TextTokenizer::from_gguf(&content).unwrap();
    tok.set_chat_template(
        "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('the last turn must be the user\\'s') }}{% endif %}{{ messages[-1]['content'] }}",
        "the chat template strict.jinja",
    )
    .unwrap();
    assert_eq!(tok.chat_prompt(None, "Hi").unwrap(), "Hi");
    let err = tok
        .chat_messages(&[ChatMessage::new("assistant", "x")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("strict.jinja") && err.contains("the last turn must be the user's"),
        "{err}"
    );
    let err = tok
        .set_chat_template("{% if %}", "the chat template broken.jinja")
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.jinja"), "{err}");
}
