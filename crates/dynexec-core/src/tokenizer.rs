//! Tokenizers from `tokenizer.json` or rebuilt from GGUF metadata, chat templates, and
//! streaming detokenization.
//!
//! A GGUF that carries a byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`) is rebuilt
//! as the Hugging Face tokenizer it came from: the pre-tokenizer follows `tokenizer.ggml.pre`
//! (SmolLM2's `smollm` splits digits one by one before the byte-level step; Qwen2's `qwen2`
//! splits words, single digits, punctuation runs and whitespace with its own regex), control tokens
//! (token type 3) and user-defined ones (4) are special added tokens, and BOS is prepended
//! only when `tokenizer.ggml.add_bos_token` says so.

pub use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A tokenizer plus what a decoder needs around it: special ids and the chat template.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Prepended to plain prompts when the model's tokenizer config says so.
    bos_to_add: Option<u32>,
    /// The BOS id, added or not (chat templates may print it).
    bos_id: Option<u32>,
    /// Ids that end a generation.
    pub eos_ids: Vec<u32>,
    /// The template `chat_prompt` and `chat_messages` render: the model's own, one set with
    /// [`Self::set_chat_template`], or a ChatML / Llama 3 fallback for files without one.
    pub chat_template: Option<ChatTemplate>,
    /// The model's chat template as written (Jinja), kept for export.
    pub chat_template_source: Option<String>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`; a `tokenizer_config.json` beside it supplies the EOS token
    /// and chat template when present.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::MissingFile(path.to_path_buf()));
        }
        let mut inner = Tokenizer::from_file(path).map_err(|e| Error::InvalidModel {
            path: path.to_path_buf(),
            message: format!("not a valid tokenizer.json: {e}"),
        })?;
        // Single sequences are never padded (e.g. MiniLM's tokenizer.json pads to 128);
        // batches are padded by the engines that build them.
        inner.with_padding(None);
        let config = path
            .parent()
            .map(|dir| dir.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
        let token_text = |key: &str| -> Option<String> {
            let value = config.as_ref()?.get(key)?;
            value
                .as_str()
                .map(str::to_string)
                .or_else(|| value.get("content")?.as_str().map(str::to_string))
        };
        let mut eos_ids = Vec::new();
        if let Some(id) = token_text("eos_token").and_then(|t| inner.token_to_id(&t)) {
            eos_ids.push(id);
        }
        let template = token_text("chat_template");
        let (bos_text, eos_text) = (
            token_text("bos_token").unwrap_or_default(),
            token_text("eos_token").unwrap_or_default(),
        );
        let chat_template = model_template(
            template.as_deref(),
            &|t| inner.token_to_id(t).is_some(),
            &bos_text,
            &eos_text,
        );
        // tokenizer.json's own post-processor adds whatever specials the model expects.
        let bos_id = token_text("bos_token").and_then(|t| inner.token_to_id(&t));
        Ok(Self {
            inner,
            bos_to_add: None,
            bos_id,
            eos_ids,
            chat_template,
            chat_template_source: template,
        })
    }

    /// Rebuilds the tokenizer stored in a GGUF's metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |key: &str| {
            md.get(key)
                .ok_or_else(|| tok_err(format!("GGUF metadata has no `{key}`")))
        };
        let model = get("tokenizer.ggml.model")?.to_string().map_err(tok_err)?;
        if model != "gpt2" {
            return Err(Error::NeedsTokenizer {
                reason: format!(
                    "GGUF tokenizer model `{model}` cannot be rebuilt (only byte-level BPE, `gpt2`)"
                ),
            });
        }
        let tokens: Vec<String> = string_array(get("tokenizer.ggml.tokens")?)?;
        let merges: Vec<(String, String)> = string_array(get("tokenizer.ggml.merges")?)?
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(format!("malformed merge `{m}`")))
            })
            .collect::<Result<_>>()?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(tok_err)?
                .iter()
                .map(int_value)
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("default");
        inner.with_pre_tokenizer(Some(pre_tokenizer_for(pre)?));
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(text, _)| AddedToken::from(text.clone(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(tok_err)?;

        let id = |key: &str| {
            md.get(key)
                .and_then(|v| int_value(v).ok())
                .map(|v| v as u32)
        };
        let flag = |key: &str| md.get(key).and_then(|v| v.to_bool().ok());
        let bos = id("tokenizer.ggml.bos_token_id");
        let bos_to_add = if flag("tokenizer.ggml.add_bos_token").unwrap_or(false) {
            bos
        } else {
            None
        };
        let mut eos_ids: Vec<u32> = [
            id("tokenizer.ggml.eos_token_id"),
            id("tokenizer.ggml.eot_token_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        eos_ids.dedup();
        let template = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let token_text = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        let chat_template = model_template(
            template.as_deref(),
            &|t| vocab_has(&tokens, t),
            &token_text(bos),
            &token_text(eos_ids.first().copied()),
        );
        Ok(Self {
            inner,
            bos_to_add,
            bos_id: bos,
            eos_ids,
            chat_template,
            chat_template_source: template,
        })
    }

    /// The length the tokenizer.json cuts every encoding to, if it sets one (MiniLM's: 128).
    pub fn truncation_limit(&self) -> Option<usize> {
        self.inner.get_truncation().map(|t| t.max_length)
    }

    /// Encodes text as given: special-token text (e.g. `<|im_start|>`) maps to its id, and
    /// only the specials the model's config adds (BOS, or tokenizer.json's post-processor).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, true).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let Some(bos) = self.bos_to_add {
            if encoding.get_ids().first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Encodes text without the specials the model adds (no BOS); special-token text still
    /// maps to its id.
    pub fn encode_without_specials(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token's text (added tokens included), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary text of one id (not decoded: byte-level markers stay), if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is one of the ids that end a generation ([`Self::eos_ids`]).
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// Formats a single user turn (plus optional system prompt) with the chat template,
    /// cueing the assistant's reply.
    pub fn chat_prompt(&self, system: Option<&str>, user: &str) -> Result<String> {
        let mut messages: Vec<ChatMessage> = system
            .map(|s| ChatMessage::new("system", s))
            .into_iter()
            .collect();
        messages.push(ChatMessage::new("user", user));
        self.chat_messages(&messages)
    }

    /// Formats a conversation with the chat template, cueing the assistant's reply.
    pub fn chat_messages(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or(Error::NoChatTemplate)?;
        template.render(messages, true)
    }

    /// Replaces the chat template with `source` (a Jinja template; `origin` names it in
    /// errors), keeping the model's BOS and EOS token text.
    pub fn set_chat_template(&mut self, source: &str, origin: &str) -> Result<()> {
        let token = |id: Option<u32>| {
            id.and_then(|i| self.inner.id_to_token(i))
                .unwrap_or_default()
        };
        let bos = token(self.bos_id);
        let eos = token(self.eos_ids.first().copied());
        let template = ChatTemplate::new(source, bos, eos, origin);
        template.check()?;
        self.chat_template = Some(template);
        Ok(())
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// The model's own template when it has one, else a fallback its vocabulary suits.
fn model_template(
    source: Option<&str>,
    has_token: &dyn Fn(&str) -> bool,
    bos: &str,
    eos: &str,
) -> Option<ChatTemplate> {
    match source {
        Some(source) => Some(ChatTemplate::new(
            source,
            bos,
            eos,
            "the model's chat template",
        )),
        None => ChatTemplate::fallback(has_token, bos, eos),
    }
}

fn vocab_has(tokens: &[String], token: &str) -> bool {
    tokens.iter().any(|t| t == token)
}

fn string_array(value: &gguf_file::Value) -> Result<Vec<String>> {
    value
        .to_vec()
        .map_err(tok_err)?
        .iter()
        .map(|v| v.to_string().cloned().map_err(tok_err))
        .collect()
}

fn int_value(value: &gguf_file::Value) -> Result<i64> {
    use gguf_file::Value::*;
    Ok(match value {
        U8(v) => *v as i64,
        I8(v) => *v as i64,
        U16(v) => *v as i64,
        I16(v) => *v as i64,
        U32(v) => *v as i64,
        I32(v) => *v as i64,
        U64(v) => *v as i64,
        I64(v) => *v,
        other => return Err(tok_err(format!("expected an integer, found {other:?}"))),
    })
}

/// Qwen2's split regex (its tokenizer.json's `Split` pre-tokenizer; llama.cpp's
/// `LLAMA_VOCAB_PRE_TYPE_QWEN2`): contractions, a letter run with at most one leading
/// non-letter, one digit at a time, punctuation runs with the line breaks after them, line
/// breaks with the spaces before them, and spaces that do not precede a word.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` stands for.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper> {
    match pre {
        "smollm" => Ok(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into()),
        "qwen2" => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_SPLIT.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?;
            // The regex has done the splitting: the byte-level step only maps bytes.
            Ok(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into())
        }
        "gpt-2" | "gpt2" | "default" => Ok(ByteLevel::new(false, true, true).into()),
        other => Err(Error::NeedsTokenizer {
            reason: format!(
                "GGUF pre-tokenizer `{other}` is not supported yet (smollm, qwen2, gpt-2 are)"
            ),
        }),
    }
}

/// Turns a growing list of ids into text deltas, holding back incomplete UTF-8 sequences
/// (byte-level BPE splits characters across tokens).
pub struct TokenStream<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    prefix_index: usize,
    read_index: usize,
}

impl<'a> TokenStream<'a> {
    /// An empty stream over `tokenizer`.
    pub fn new(tokenizer: &'a TextTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_index: 0,
            read_index: 0,
        }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_index..self.read_index])?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_index..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_index = self.read_index;
            self.read_index = self.ids.len();
            Ok(Some(delta))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back at the end (possibly invalid UTF-8, shown lossily).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_index..self.read_index])?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_index..])?;
        self.prefix_index = self.ids.len();
        self.read_index = self.ids.len();
        if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
            Ok(Some(full[prefix.len()..].to_string()))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2s_template_renders_its_default_system_prompt() {
        let t = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let tmpl = ChatTemplate::new(t, "", "<|im_end|>", "test");
        let render = |m: &[ChatMessage]| tmpl.render(m, true).unwrap();
        assert_eq!(
            render(&[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")]),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            render(&[ChatMessage::new("user", "Hi")]),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn unsupported_pre_tokenizers_say_what_to_do() {
        let err = pre_tokenizer_for("mystery").unwrap_err();
        assert!(
            matches!(&err, Error::NeedsTokenizer { reason } if reason.contains("`mystery`")),
            "{err}"
        );
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
}
