//! A model's own chat template (`tokenizer.chat_template`), rendered as Hugging Face
//! transformers renders it.
//!
//! Chat templates are Jinja programs written for Python's `jinja2`. They are rendered here
//! with `minijinja` in the environment transformers uses (`trim_blocks`, `lstrip_blocks`,
//! loop controls, Python string methods such as `.strip()` through minijinja-contrib's
//! pycompat), with the variables transformers and llama.cpp pass: `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, and the functions `raise_exception`
//! (a template's way to refuse a conversation) and a Python-style `tojson`. Files without
//! a template fall back to ChatML or Llama 3, chosen from the vocabulary, written as Jinja
//! templates of the same kind.

use crate::{Error, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};

/// ChatML (`<|im_start|>role\n...<|im_end|>\n`), for vocabularies that have its tokens but
/// files that carry no template.
const CHATML_FALLBACK: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Llama 3's header format, likewise.
const LLAMA3_FALLBACK: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// One turn of a conversation: `system`, `user` or `assistant`, and its text.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl ChatMessage {
    /// A turn by `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled-checked chat template and the special tokens it may print.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for error messages ("the model's", a file name).
    origin: String,
}

impl ChatTemplate {
    /// A template from its Jinja `source`; `origin` names it in errors. Syntax errors show
    /// when it is rendered (a model whose template is broken still loads for plain prompts),
    /// or earlier through [`Self::check`].
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
        origin: impl Into<String>,
    ) -> Self {
        Self {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            origin: origin.into(),
        }
    }

    /// Parses the template, so a broken one is reported before any prompt reaches it.
    pub fn check(&self) -> Result<()> {
        environment()
            .template_from_str(&self.source)
            .map(|_| ())
            .map_err(|e| self.error(&e))
    }

    /// The template for a file that carries none: ChatML or Llama 3 where the vocabulary has
    /// their tokens, else `None`.
    pub fn fallback(
        has_token: &dyn Fn(&str) -> bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Option<Self> {
        let source = if has_token("<|im_start|>") {
            CHATML_FALLBACK
        } else if has_token("<|start_header_id|>") {
            LLAMA3_FALLBACK
        } else {
            return None;
        };
        Some(Self::new(
            source,
            bos_token,
            eos_token,
            "the built-in fallback template",
        ))
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt`, ends with the cue for the
    /// assistant's next turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = environment();
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                map([
                    ("role", m.role.as_str().into()),
                    ("content", m.content.as_str().into()),
                ])
            })
            .collect();
        let context = map([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", self.bos_token.as_str().into()),
            ("eos_token", self.eos_token.as_str().into()),
        ]);
        env.render_str(&self.source, context)
            .map_err(|e| self.error(&e))
    }

    fn error(&self, e: &minijinja::Error) -> Error {
        if e.kind() == ErrorKind::InvalidOperation {
            if let Some(detail) = e.detail().filter(|d| d.starts_with(RAISED)) {
                return Error::ChatTemplate {
                    origin: self.origin.clone(),
                    message: format!("it refuses this conversation: {}", &detail[RAISED.len()..]),
                };
            }
        }
        let mut message = e.to_string();
        if let Some(line) = e.line() {
            message.push_str(&format!(" (template line {line})"));
        }
        Error::ChatTemplate {
            origin: self.origin.clone(),
            message,
        }
    }
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let map: std::collections::BTreeMap<String, Value> = entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    Value::from(map)
}

/// The marker `raise_exception` puts before its message.
const RAISED: &str = "raise_exception: ";

/// The environment transformers renders chat templates in.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("{RAISED}{message}"),
            ))
        },
    );
    env.add_filter("tojson", python_tojson);
    env
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' `tojson` does
/// (minijinja's own escapes `<`, `>`, `&` and `'` for HTML, which a prompt must not).
fn python_tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("cannot write as JSON: {e}"),
        )
    })?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(
    value: &serde_json::Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chatml() -> ChatTemplate {
        ChatTemplate::fallback(&|t| t == "<|im_start|>", "", "<|im_end|>").unwrap()
    }

    #[test]
    fn the_chatml_fallback_renders_every_turn_and_the_cue() {
        let turns = [
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
            ChatMessage::new("user", "Bye"),
        ];
        assert_eq!(
            chatml().render(&turns, true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!chatml()
            .render(&turns, false)
            .unwrap()
            .ends_with("assistant\n"));
    }

    #[test]
    fn the_llama3_fallback_starts_with_bos() {
        let t = ChatTemplate::fallback(&|t| t == "<|start_header_id|>", "<|begin_of_text|>", "")
            .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "Hi ")], true).unwrap(),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert!(ChatTemplate::fallback(&|_| false, "", "").is_none());
    }

    #[test]
    fn raise_exception_is_a_clear_error() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}ok";
        let t = ChatTemplate::new(source, "", "", "the model's chat template");
        t.check().unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], true).unwrap(),
            "ok"
        );
        let err = t
            .render(&[ChatMessage::new("assistant", "x")], true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the model's chat template")
                && err.contains("Conversations must start with the user"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_are_caught_when_the_template_is_loaded() {
        let broken = ChatTemplate::new("{% for m in messages %}", "", "", "t.jinja");
        let err = broken.check().unwrap_err().to_string();
        assert!(err.contains("t.jinja"), "{err}");
        let err = broken.render(&[], true).unwrap_err().to_string();
        assert!(err.contains("t.jinja"), "{err}");
    }

    #[test]
    fn python_methods_and_tojson_work_as_in_jinja2() {
        let t = ChatTemplate::new(
            "{{ messages[0].content.strip() }}|{{ {'a': [1, 'x<y']} | tojson }}|{{ [1, 2] | tojson(indent=2) }}",
            "",
            "",
            "t",
        );
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi  ")], false)
                .unwrap(),
            "hi|{\"a\": [1, \"x<y\"]}|[\n  1,\n  2\n]"
        );
    }
}
