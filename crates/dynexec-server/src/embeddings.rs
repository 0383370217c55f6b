//! `POST /v1/embeddings` in OpenAI's shape, served by a BERT-family sentence encoder next to
//! the decoder (`serve --embedding minilm-l6`): mean pooling over the tokens and L2
//! normalization, as sentence-transformers computes them, so cosines are dot products.
//!
//! The encoder runs on blocking threads, one request at a time: it shares the machine's
//! cores with the decoder's engine thread, and a batch of inputs already fills them.

use crate::api::{ApiError, Fields};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_models::bert::Bert;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// Inputs encoded per forward: padded to the longest of them.
const BATCH: usize = 16;

/// A sentence encoder and the name clients call it by.
pub struct Embedder {
    name: String,
    bert: Bert,
    tokenizer: TextTokenizer,
    /// The tokenizer without its truncation: inputs are measured whole, so one that is too
    /// long is refused rather than cut short in silence.
    counter: tokenizers::Tokenizer,
    /// The most tokens an input may have.
    max_tokens: usize,
    running: Arc<Semaphore>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("name", &self.name)
            .finish()
    }
}

/// What one request asked for, checked.
struct EmbeddingRequest {
    inputs: Vec<String>,
    base64: bool,
}

impl Embedder {
    /// Serves `bert` with `tokenizer` as the model `name`.
    /// The input limit is the tokenizer's truncation length where it has one (the length the
    /// encoder was trained to pool over: 128 for all-MiniLM-L6-v2), else the encoder's positions.
    pub fn new(name: String, bert: Bert, tokenizer: TextTokenizer) -> Self {
        let positions = bert.config().max_position_embeddings;
        let max_tokens = tokenizer
            .truncation_limit()
            .unwrap_or(positions)
            .min(positions);
        let mut counter = tokenizer.inner().clone();
        let _ = counter.with_truncation(None);
        Self {
            name,
            bert,
            tokenizer,
            counter,
            max_tokens,
            running: Arc::new(Semaphore::new(1)),
        }
    }

    /// The name clients give as `model`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The embedding width.
    pub fn dimensions(&self) -> usize {
        self.bert.config().hidden_size
    }

    /// The most tokens one input may have, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The unit-length embedding of each text, with the tokens they took.
    pub fn embed(&self, texts: &[String]) -> dynexec_core::Result<(Vec<Vec<f32>>, usize)> {
        let mut tokens = 0;
        for (i, text) in texts.iter().enumerate() {
            let n = self
                .counter
                .encode(text.as_str(), true)
                .map_err(|e| dynexec_core::Error::InvalidArgument(format!("input {i}: {e}")))?
                .len();
            if n > self.max_tokens() {
                return Err(dynexec_core::Error::InvalidArgument(format!(
                    "input {i} is {n} tokens long, but `{}` takes at most {}: shorten or split it",
                    self.name,
                    self.max_tokens()
                )));
            }
            tokens += n;
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let embeddings = self
            .bert
            .sentence_embeddings(&self.tokenizer, &refs, BATCH)?
            .to_vec2::<f32>()?;
        Ok((embeddings, tokens))
    }

    /// Answers one request body.
    pub async fn answer(self: Arc<Self>, body: &[u8]) -> Result<Value, ApiError> {
        let request = self.read(body)?;
        let permit = self.running.clone().acquire_owned().await.map_err(|_| {
            ApiError::server(503, "server_error", "the server is shutting down")
                .with_code(503, "shutting_down")
        })?;
        let embedder = self.clone();
        let inputs = request.inputs;
        let (embeddings, tokens) = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            embedder.embed(&inputs)
        })
        .await
        .map_err(|_| ApiError::server(500, "server_error", "the encoder failed"))?
        .map_err(|e| match e {
            dynexec_core::Error::InvalidArgument(message) => {
                ApiError::invalid(Some("input"), message)
            }
            other => ApiError::server(500, "server_error", other.to_string()),
        })?;
        let data: Vec<Value> = embeddings
            .iter()
            .enumerate()
            .map(|(index, e)| {
                let embedding = if request.base64 {
                    json!(base64_f32(e))
                } else {
                    json!(e)
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        Ok(json!({
            "object": "list",
            "data": data,
            "model": self.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
    }

    fn read(&self, body: &[u8]) -> Result<EmbeddingRequest, ApiError> {
        let mut fields = Fields::parse(body)?;
        if let Some(model) = fields.string("model")? {
            if !model.is_empty() && model != self.name {
                return Err(ApiError::invalid(
                    Some("model"),
                    format!(
                        "the embedding model `{model}` does not exist here: this server embeds with `{}`",
                        self.name
                    ),
                )
                .with_code(404, "model_not_found"));
            }
        }
        let bad_input = || {
            ApiError::invalid(
                Some("input"),
                "`input` must be a string or a list of strings (token-id inputs are not supported: send text)",
            )
        };
        let inputs: Vec<String> = match fields.take("input") {
            None => {
                return Err(ApiError::invalid(
                    Some("input"),
                    "`input` is missing: send the text to embed",
                ))
            }
            Some(Value::String(text)) => vec![text],
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(text) => Ok(text),
                    _ => Err(bad_input()),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad_input()),
        };
        if inputs.is_empty() || inputs.len() > MAX_INPUTS {
            return Err(ApiError::invalid(
                Some("input"),
                format!("`input` must hold 1 to {MAX_INPUTS} texts"),
            ));
        }
        if inputs.iter().any(|t| t.is_empty()) {
            return Err(ApiError::invalid(
                Some("input"),
                "`input` holds an empty string: every input needs text",
            ));
        }
        let base64 = match fields.string("encoding_format")?.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    Some("encoding_format"),
                    format!("`encoding_format` `{other}`: use float or base64"),
                ))
            }
        };
        if let Some(dimensions) = fields.count("dimensions")? {
            if dimensions != self.dimensions() {
                return Err(ApiError::invalid(
                    Some("dimensions"),
                    format!(
                        "`{}` embeds in {} dimensions and cannot shorten them; omit `dimensions` or send {}",
                        self.name,
                        self.dimensions(),
                        self.dimensions()
                    ),
                ));
            }
        }
        fields.finish()?;
        Ok(EmbeddingRequest { inputs, base64 })
    }
}

/// The little-endian bytes of `values` in standard base64, as OpenAI sends
/// `encoding_format: "base64"` embeddings.
fn base64_f32(values: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_the_standard_alphabet_with_padding() {
        // 1.0f32 is 00 00 80 3f, -2.0f32 is 00 00 00 c0 (little-endian).
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, -2.0]), "AACAPwAAAMA=");
        assert_eq!(base64_f32(&[]), "");
    }
}
