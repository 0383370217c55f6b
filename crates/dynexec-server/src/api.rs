//! The OpenAI request bodies, their checks, and the error bodies clients understand.
//!
//! Fields OpenAI defines that dynexec does not use (`user`, `presence_penalty`, ...) are
//! accepted and ignored, as vLLM and llama-server do; fields whose meaning would change the
//! output but are unsupported (`n` > 1, `logprobs`, tools) are refused with a 400.

use crate::engine::{Dynamic, ModelInfo};
use dynexec_core::sampling::SamplingParams;
use dynexec_core::tokenizer::ChatMessage;
use dynexec_core::Setting;
use dynexec_exit::token_exit::TokenExitPolicy;
use dynexec_models::generation::GenerateOptions;
use serde::Deserialize;
use serde_json::Value;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status of the response.
    pub status: u16,
    /// What went wrong and how to fix it, for people.
    pub message: String,
    /// OpenAI's `type`, e.g. `invalid_request_error` or `server_error`.
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<&'static str>,
    /// A machine-readable code, e.g. `context_length_exceeded`.
    pub code: Option<&'static str>,
}

/// The request field that sets `setting`, for those a request can set.
pub fn field(setting: Setting) -> Option<&'static str> {
    match setting {
        Setting::Temperature => Some("temperature"),
        Setting::TopP => Some("top_p"),
        Setting::RepetitionPenalty => Some("repetition_penalty"),
        Setting::Lookahead => Some("lookahead"),
        Setting::EarlyExit => Some("early_exit"),
        _ => None,
    }
}

/// A library error as the API reports it: a setting out of range names its request field.
pub fn setting_error(e: dynexec_core::Error) -> ApiError {
    match e {
        dynexec_core::Error::InvalidSetting {
            setting,
            requirement,
        } => match field(setting) {
            Some(name) => ApiError::invalid(Some(name), format!("`{name}` {requirement}")),
            None => ApiError::invalid(None, format!("{setting} {requirement}")),
        },
        dynexec_core::Error::BadSpec {
            setting,
            spec,
            help,
        } => {
            let name = field(setting);
            let shown = name.map_or(setting.to_string(), |n| format!("`{n}`"));
            ApiError::invalid(name, format!("bad {shown} `{spec}`: {help}"))
        }
        dynexec_core::Error::Context { context, cause } => {
            let mut error = setting_error(*cause);
            error.message = format!("{context}: {}", error.message);
            error
        }
        e => ApiError::invalid(None, e.to_string()),
    }
}

impl ApiError {
    /// A 400 `invalid_request_error`, blaming `param` when given.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    /// The same error with another HTTP status and a `code`.
    pub fn with_code(mut self, status: u16, code: &'static str) -> Self {
        self.status = status;
        self.code = Some(code);
        self
    }

    /// An error that is not the request's fault (overload, shutdown, a failed generation).
    pub fn server(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// The JSON response body.
    pub fn body(&self) -> Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// The body of `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Must name the served model when given ([`check_model`]).
    pub model: Option<String>,
    /// The conversation so far; at least one message.
    pub messages: Vec<RequestMessage>,
    /// Everything else.
    #[serde(flatten)]
    pub params: Params,
}

/// One message of a chat request.
#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    /// `system`, `developer` (read as `system`), `user` or `assistant`.
    pub role: String,
    /// A string, or a list of `{"type": "text", "text": ...}` parts.
    #[serde(default)]
    pub content: Value,
}

/// The body of `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Must name the served model when given ([`check_model`]).
    pub model: Option<String>,
    /// A string, a list of one string, or a list of token ids.
    pub prompt: Value,
    /// Everything else.
    #[serde(flatten)]
    pub params: Params,
}

/// Parameters both endpoints share, including dynexec's own.
#[derive(Debug, Default, Deserialize)]
pub struct Params {
    /// Answer as server-sent events, one per text delta.
    #[serde(default)]
    pub stream: bool,
    /// Streaming extras.
    pub stream_options: Option<StreamOptions>,
    /// In `0..=2`; 1 when left out, 0 is greedy.
    pub temperature: Option<f64>,
    /// Nucleus-sampling mass in (0, 1]; 1 turns it off.
    pub top_p: Option<f64>,
    /// Not OpenAI's, but llama-server's and vLLM's.
    pub top_k: Option<usize>,
    /// Tokens to generate, at most the server's limit; by default that limit or the rest of
    /// the context, whichever is smaller.
    pub max_tokens: Option<usize>,
    /// OpenAI's newer name for `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<usize>,
    /// A string, or a list of up to 4, that ends generation when produced.
    pub stop: Option<Value>,
    /// Sampling seed; random when left out.
    pub seed: Option<u64>,
    /// Completions per request; only 1 is accepted.
    pub n: Option<usize>,
    /// Refused unless `false` or null: log-probabilities are not supported.
    pub logprobs: Option<Value>,
    /// Refused unless null: tool calls are not supported.
    pub tools: Option<Value>,
    /// vLLM's: keep generating past end-of-sequence (fixed-length benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// llama-server's and vLLM's name for the repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// dynexec: decode speculatively with the server's draft (default: when it has one).
    pub speculative: Option<bool>,
    /// dynexec: the lookahead for speculative decoding, e.g. `fixed:4`.
    pub lookahead: Option<String>,
    /// dynexec: per-token early exit, e.g. `confidence:0.9`.
    pub early_exit: Option<String>,
}

/// OpenAI's `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk carrying the token counts.
    #[serde(default)]
    pub include_usage: bool,
}

/// A checked request, ready for the engine.
#[derive(Debug)]
pub struct Prepared {
    /// The prompt, encoded and checked against the vocabulary and the context.
    pub prompt_ids: Vec<u32>,
    /// Token budget, sampling settings and whether end-of-sequence stops.
    pub options: GenerateOptions,
    /// Stop strings (at most 4).
    pub stop: Vec<String>,
    /// Speculative decoding or early exit, as the request asked and the server allows.
    pub dynamic: Dynamic,
    /// Answer as server-sent events.
    pub stream: bool,
    /// End a stream with a usage chunk.
    pub include_usage: bool,
}

/// Server-side limits a request must respect.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most tokens one request may ask for; also the default.
    pub max_tokens: usize,
}

/// Parses a JSON body, turning serde's complaint into a 400 that names the problem.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            None,
            "the request body is empty: send a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the request body is not valid JSON"
        } else {
            "the request body does not fit the API"
        };
        ApiError::invalid(None, format!("{what}: {e}"))
    })
}

/// The model a request names must be the one served (or be left out).
pub fn check_model(requested: Option<&str>, info: &ModelInfo) -> Result<(), ApiError> {
    match requested {
        Some(name) if name != info.name && !name.is_empty() => Err(ApiError::invalid(
            Some("model"),
            format!(
                "the model `{name}` does not exist here: this server serves `{}` (see GET /v1/models)",
                info.name
            ),
        )
        .with_code(404, "model_not_found")),
        _ => Ok(()),
    }
}

/// The conversation of a chat request.
pub fn chat_messages(messages: &[RequestMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "`messages` is empty: send at least one message",
        ));
    }
    messages
        .iter()
        .map(|m| {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant"
            ) {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!(
                        "unsupported message role `{}`: use system, user or assistant",
                        m.role
                    ),
                ));
            }
            // OpenAI's newer name for the system role.
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            Ok(ChatMessage::new(role, message_text(&m.content)?))
        })
        .collect()
}

fn message_text(content: &Value) -> Result<String, ApiError> {
    let bad = || {
        ApiError::invalid(
            Some("messages"),
            "a message's `content` must be a string or a list of text parts",
        )
    };
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type"), p.get("text")) {
                (Some(Value::String(t)), Some(Value::String(text))) if t == "text" => {
                    Ok(text.as_str())
                }
                _ => Err(ApiError::invalid(
                    Some("messages"),
                    "only text content parts (`{\"type\": \"text\", \"text\": ...}`) are supported",
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        _ => Err(bad()),
    }
}

/// The prompt of a completion request: text to encode, or token ids as given.
pub enum PromptInput {
    /// Text, encoded with the model's tokenizer.
    Text(String),
    /// Token ids, used as they are.
    Ids(Vec<u32>),
}

/// Reads a completion's `prompt`: a string, a list of one string, or a list of token ids;
/// several prompts are refused.
pub fn completion_prompt(prompt: &Value) -> Result<PromptInput, ApiError> {
    let bad = |m: &str| ApiError::invalid(Some("prompt"), m);
    match prompt {
        Value::String(s) => Ok(PromptInput::Text(s.clone())),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => Ok(PromptInput::Text(
            items[0].as_str().unwrap_or_default().to_string(),
        )),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| bad("token ids must fit in 32 bits"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(PromptInput::Ids),
        Value::Array(items) if items.len() > 1 => Err(bad(
            "one prompt per request: send several requests to complete several prompts",
        )),
        _ => Err(bad(
            "`prompt` must be a string, a list of one string, or a list of token ids",
        )),
    }
}

/// Checks the parameters against the model and the server, and builds the engine's job.
pub fn prepare(
    params: &Params,
    prompt_ids: Vec<u32>,
    info: &ModelInfo,
    limits: Limits,
) -> Result<Prepared, ApiError> {
    if params.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            Some("n"),
            "`n` must be 1: send several requests for several completions",
        ));
    }
    if params
        .logprobs
        .as_ref()
        .is_some_and(|v| v != &Value::Bool(false) && !v.is_null())
    {
        return Err(ApiError::invalid(
            Some("logprobs"),
            "`logprobs` is not supported",
        ));
    }
    if params.tools.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid(
            Some("tools"),
            "tool calls are not supported",
        ));
    }
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid(
            Some("prompt"),
            "the prompt is empty: give some text to continue",
        ));
    }
    if let Some(bad) = prompt_ids
        .iter()
        .find(|&&id| id as usize >= info.tokenizer.vocab_size())
    {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                info.tokenizer.vocab_size()
            ),
        ));
    }
    let context = info.context_length;
    let prompt_tokens = prompt_ids.len();
    if prompt_tokens >= context {
        return Err(ApiError::invalid(
            Some("messages"),
            format!(
                "the prompt is {prompt_tokens} tokens but the model's context holds {context}: shorten it"
            ),
        )
        .with_code(400, "context_length_exceeded"));
    }
    let requested = params.max_completion_tokens.or(params.max_tokens);
    let max_tokens = match requested {
        Some(0) => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                "`max_tokens` must be at least 1",
            ))
        }
        Some(n) if n > limits.max_tokens => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "`max_tokens` is {n} but this server allows at most {} per request (its limit)",
                    limits.max_tokens
                ),
            ))
        }
        Some(n) if prompt_tokens + n > context => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "this model's context holds {context} tokens, but {} were requested ({prompt_tokens} in the prompt, {n} to generate): lower max_tokens or shorten the prompt",
                    prompt_tokens + n
                ),
            )
            .with_code(400, "context_length_exceeded"))
        }
        Some(n) => n,
        // Unasked, generation runs to the server's limit or the end of the context.
        None => limits.max_tokens.min(context - prompt_tokens),
    };
    let temperature = params.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            "`temperature` must be between 0 and 2",
        ));
    }
    let sampling = SamplingParams {
        temperature,
        top_k: params.top_k.filter(|&k| k > 0),
        top_p: params.top_p.filter(|&p| p < 1.0),
        repetition_penalty: params.repetition_penalty.unwrap_or(1.0),
        repeat_last_n: 64,
        seed: params.seed.unwrap_or_else(random_seed),
    };
    sampling.validate().map_err(setting_error)?;
    let stop = match &params.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 && items.iter().all(Value::is_string) => {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        }
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stop"),
                "`stop` must be a string or a list of up to 4 strings",
            ))
        }
    };
    let dynamic = dynamic_options(params, info)?;
    Ok(Prepared {
        prompt_ids,
        options: GenerateOptions {
            max_tokens,
            sampling,
            stop_at_eos: !params.ignore_eos,
        },
        stop,
        dynamic,
        stream: params.stream,
        include_usage: params
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    })
}

/// Speculative decoding and early exit as the request and the server allow.
fn dynamic_options(params: &Params, info: &ModelInfo) -> Result<Dynamic, ApiError> {
    let early_exit = match &params.early_exit {
        None => None,
        Some(spec) => {
            let policy = TokenExitPolicy::parse(spec).map_err(setting_error)?;
            if info.exit_layers.is_none() {
                return Err(ApiError::invalid(
                    Some("early_exit"),
                    "this server has no exit adapters: start it with them to allow early_exit",
                ));
            }
            Some(policy)
        }
    };
    let wants_speculative = match (params.speculative, &params.lookahead) {
        (Some(false), Some(_)) => {
            return Err(ApiError::invalid(
                Some("lookahead"),
                "`lookahead` needs speculative decoding, but `speculative` is false",
            ))
        }
        (Some(on), _) => on,
        (None, Some(_)) => true,
        // By default a server with a draft drafts, except for early-exit requests.
        (None, None) => info.draft.is_some() && early_exit.is_none(),
    };
    if wants_speculative && early_exit.is_some() {
        return Err(ApiError::invalid(
            Some("early_exit"),
            "`early_exit` cannot be combined with speculative decoding: send `\"speculative\": false`",
        ));
    }
    let speculative = match (wants_speculative, &info.draft) {
        (false, _) => None,
        (true, None) => return Err(ApiError::invalid(
            Some("speculative"),
            "this server has no draft: start it with a draft model to allow speculative decoding",
        )),
        (true, Some(_)) => {
            let lookahead = params.lookahead.clone().unwrap_or(info.lookahead.clone());
            dynexec_spec::lookahead::parse(&lookahead).map_err(setting_error)?;
            Some(lookahead)
        }
    };
    if speculative.is_some() && params.repetition_penalty.is_some_and(|p| p != 1.0) {
        return Err(ApiError::invalid(
            Some("repetition_penalty"),
            "`repetition_penalty` cannot be combined with speculative decoding: send `\"speculative\": false`",
        ));
    }
    Ok(Dynamic {
        speculative,
        early_exit,
    })
}

/// A seed for requests that give none: every such request samples differently.
fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynexec_core::Error;

    /// Library errors about a setting come back in the API's terms: the request field, named
    /// in the message and as `param`; settings a request cannot set keep their plain name.
    #[test]
    fn setting_errors_name_the_request_field() {
        let e = setting_error(Error::setting(Setting::TopP, "must be in (0, 1]"));
        assert_eq!((e.status, e.param), (400, Some("top_p")));
        assert_eq!(e.message, "`top_p` must be in (0, 1]");
        let e = setting_error(Error::BadSpec {
            setting: Setting::Lookahead,
            spec: "sometimes".into(),
            help: "use fixed:K".into(),
        });
        assert_eq!(e.param, Some("lookahead"));
        assert_eq!(e.message, "bad `lookahead` `sometimes`: use fixed:K");
        let e = setting_error(Error::setting(Setting::BatchSize, "must be at least 1"));
        assert_eq!(e.param, None);
        assert_eq!(e.message, "the batch size must be at least 1");
    }
}
