//! The OpenAI request bodies, their checks, and the error bodies clients understand.
//!
//! Every field is read by name ([`Fields`]), so errors name the JSON field and say what it
//! must be. Nothing that would change the answer is ignored: a field dynexec implements is
//! honoured, one it does not (`response_format`, `tool_choice`, `echo`, `best_of`, ...) is
//! refused with a 400 naming it unless it holds its neutral value (`{"type": "text"}`,
//! `"none"`, `false`, `1`), and an unknown field is refused too. Only fields that cannot
//! change the answer (`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`)
//! are accepted and ignored.

use crate::engine::{Dynamic, ModelInfo};
use dynexec_core::sampling::{SamplingParams, GREEDY_BELOW};
use dynexec_core::tokenizer::ChatMessage;
use dynexec_core::Setting;
use dynexec_exit::token_exit::TokenExitPolicy;
use dynexec_models::generation::GenerateOptions;
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
    pub param: Option<String>,
    /// A machine-readable code, e.g. `context_length_exceeded`.
    pub code: Option<&'static str>,
}

/// The request field that sets `setting`, for those a request can set.
pub fn field(setting: Setting) -> Option<&'static str> {
    match setting {
        Setting::Temperature => Some("temperature"),
        Setting::TopP => Some("top_p"),
        Setting::RepetitionPenalty => Some("repetition_penalty"),
        Setting::FrequencyPenalty => Some("frequency_penalty"),
        Setting::PresencePenalty => Some("presence_penalty"),
        Setting::LogitBias => Some("logit_bias"),
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
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
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

/// A JSON request body's fields, read one by one by name; [`Fields::finish`] refuses what
/// is left, so nothing sent is silently ignored.
pub struct Fields(serde_json::Map<String, Value>);

/// Fields that cannot change the answer: accepted and ignored (OpenAI's bookkeeping).
const IGNORED: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
];

/// OpenAI fields dynexec does not implement, each with the value that asks for nothing (and
/// is therefore accepted) and why the rest is refused.
const UNSUPPORTED: &[(&str, fn(&Value) -> bool, &str)] = &[
    (
        "response_format",
        |v| {
            v.get("type") == Some(&Value::from("text"))
                && v.as_object().is_some_and(|o| o.len() == 1)
        },
        "structured output (JSON mode, schemas) is not supported; only {\"type\": \"text\"}",
    ),
    (
        "tools",
        |v| v.as_array().is_some_and(Vec::is_empty),
        "tool calls are not supported",
    ),
    (
        "tool_choice",
        |v| v == "none",
        "tool calls are not supported; only \"none\"",
    ),
    (
        "functions",
        |v| v.as_array().is_some_and(Vec::is_empty),
        "function calls are not supported",
    ),
    (
        "function_call",
        |v| v == "none",
        "function calls are not supported; only \"none\"",
    ),
    (
        "echo",
        |v| v == &Value::Bool(false),
        "echoing the prompt is not supported",
    ),
    (
        "best_of",
        |v| v == 1,
        "only best_of 1 is supported: send several requests",
    ),
    (
        "n",
        |v| v == 1,
        "`n` must be 1: send several requests for several completions",
    ),
    (
        "suffix",
        |v| v == "",
        "completing with a suffix (fill-in-the-middle) is not supported",
    ),
    (
        "logprobs",
        |v| v == &Value::Bool(false) || v == 0,
        "log-probabilities are not supported",
    ),
    (
        "top_logprobs",
        |v| v == 0,
        "log-probabilities are not supported",
    ),
    (
        "modalities",
        |v| v == &serde_json::json!(["text"]),
        "only text output is supported",
    ),
    ("audio", |_| false, "audio output is not supported"),
    (
        "prediction",
        |_| false,
        "predicted outputs are not supported",
    ),
    (
        "reasoning_effort",
        |_| false,
        "these models have no reasoning-effort setting",
    ),
    (
        "web_search_options",
        |_| false,
        "web search is not supported",
    ),
    (
        "min_p",
        |v| v == 0,
        "min-p sampling is not supported: use top_p or top_k",
    ),
    (
        "min_tokens",
        |v| v == 0,
        "a minimum length is not supported",
    ),
];

impl Fields {
    /// The fields of a JSON object body; anything else is a 400 that says what is wrong.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid(
                None,
                "the request body is empty: send a JSON object",
            ));
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::invalid(
                None,
                "the request body must be a JSON object (`{...}`)",
            )),
            Err(e) => Err(ApiError::invalid(
                None,
                format!("the request body is not valid JSON: {e}"),
            )),
        }
    }

    /// Takes a field; `null` counts as absent.
    pub fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }

    fn typed<T>(
        &mut self,
        name: &str,
        what: &str,
        read: impl FnOnce(&Value) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => read(&v)
                .map(Some)
                .ok_or_else(|| ApiError::invalid(Some(name), format!("`{name}` must be {what}"))),
        }
    }

    /// A boolean field.
    pub fn bool(&mut self, name: &str) -> Result<Option<bool>, ApiError> {
        self.typed(name, "true or false", Value::as_bool)
    }

    /// A finite number.
    pub fn number(&mut self, name: &str) -> Result<Option<f64>, ApiError> {
        self.typed(name, "a number", |v| v.as_f64().filter(|x| x.is_finite()))
    }

    /// A whole number (`3` or `3.0`).
    pub fn integer(&mut self, name: &str) -> Result<Option<i64>, ApiError> {
        self.typed(name, "a whole number", whole_number)
    }

    /// A whole number >= 0 that fits the machine's sizes.
    pub fn count(&mut self, name: &str) -> Result<Option<usize>, ApiError> {
        self.typed(name, "a whole number >= 0", |v| {
            whole_number(v).and_then(|n| usize::try_from(n).ok())
        })
    }

    /// A string.
    pub fn string(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        self.typed(name, "a string", |v| v.as_str().map(str::to_string))
    }

    /// Refuses every field left: unsupported ones unless neutral, unknown ones always.
    pub fn finish(mut self) -> Result<(), ApiError> {
        for name in IGNORED {
            self.0.remove(*name);
        }
        for (name, neutral, why) in UNSUPPORTED {
            if let Some(v) = self.take(name) {
                if !neutral(&v) {
                    return Err(ApiError::invalid(Some(name), format!("`{name}`: {why}")));
                }
            }
        }
        match self.0.keys().find(|k| !self.0[k.as_str()].is_null()) {
            Some(name) => Err(ApiError::invalid(
                Some(name),
                format!("unknown field `{name}`: dynexec does not implement it, so it would be ignored; remove it"),
            )),
            None => Ok(()),
        }
    }
}

/// `3`, or `3.0` as some clients write it.
fn whole_number(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|x| x.fract() == 0.0 && x.abs() < 9e15)
            .map(|x| x as i64)
    })
}

/// A checked `POST /v1/chat/completions` body.
#[derive(Debug)]
pub struct ChatRequest {
    /// Must name the served model when given ([`check_model`]).
    pub model: Option<String>,
    /// The conversation so far; at least one message.
    pub messages: Vec<ChatMessage>,
    /// Everything else.
    pub params: Params,
}

impl ChatRequest {
    /// Reads and checks a body.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let mut fields = Fields::parse(body)?;
        let model = fields.string("model")?;
        let messages = chat_messages(fields.take("messages"))?;
        let params = Params::take(&mut fields, Endpoint::Chat)?;
        fields.finish()?;
        Ok(Self {
            model,
            messages,
            params,
        })
    }
}

/// A checked `POST /v1/completions` body.
#[derive(Debug)]
pub struct CompletionRequest {
    /// Must name the served model when given ([`check_model`]).
    pub model: Option<String>,
    /// The prompt: text, or token ids.
    pub prompt: PromptInput,
    /// Everything else.
    pub params: Params,
}

impl CompletionRequest {
    /// Reads and checks a body.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let mut fields = Fields::parse(body)?;
        let model = fields.string("model")?;
        let prompt = completion_prompt(fields.take("prompt"))?;
        let params = Params::take(&mut fields, Endpoint::Completion)?;
        fields.finish()?;
        Ok(Self {
            model,
            prompt,
            params,
        })
    }
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completion,
}

impl Endpoint {
    /// The field that holds the prompt.
    pub fn prompt_field(self) -> &'static str {
        match self {
            Endpoint::Chat => "messages",
            Endpoint::Completion => "prompt",
        }
    }
}

/// Parameters both endpoints share, including dynexec's own.
#[derive(Debug, Default)]
pub struct Params {
    /// Which endpoint they came to.
    pub endpoint: Option<Endpoint>,
    /// Answer as server-sent events, one per text delta.
    pub stream: bool,
    /// End a stream with a usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// In `0..=2`; 1 when left out; below 1e-5 is greedy (as vLLM).
    pub temperature: Option<f64>,
    /// Nucleus-sampling mass in (0, 1]; 1 turns it off.
    pub top_p: Option<f64>,
    /// Not OpenAI's, but llama-server's and vLLM's; 0 or -1 turn it off.
    pub top_k: Option<usize>,
    /// Tokens to generate (`max_completion_tokens` wins over `max_tokens`), at most the
    /// server's limit; by default that limit or the rest of the context, whichever is smaller.
    pub max_tokens: Option<usize>,
    /// Strings that end generation when produced (at most 4).
    pub stop: Vec<String>,
    /// Sampling seed; random when left out.
    pub seed: Option<u64>,
    /// vLLM's: keep generating past end-of-sequence (fixed-length benchmarks).
    pub ignore_eos: bool,
    /// llama-server's and vLLM's name for the repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// OpenAI's, in [-2, 2].
    pub frequency_penalty: f32,
    /// OpenAI's, in [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI's: token id to a bias in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    /// dynexec: decode speculatively with the server's draft (default: when it has one).
    pub speculative: Option<bool>,
    /// dynexec: the lookahead for speculative decoding, e.g. `fixed:4`.
    pub lookahead: Option<String>,
    /// dynexec: per-token early exit, e.g. `confidence:0.9`.
    pub early_exit: Option<String>,
}

impl Params {
    /// Takes the shared parameters out of `fields`, checking each one's type.
    pub fn take(fields: &mut Fields, endpoint: Endpoint) -> Result<Self, ApiError> {
        let include_usage = match fields.take("stream_options") {
            None => false,
            Some(Value::Object(mut options)) => {
                let include = options.remove("include_usage").unwrap_or(Value::Null);
                if let Some(name) = options.keys().next() {
                    return Err(ApiError::invalid(
                        Some("stream_options"),
                        format!("unknown field `stream_options.{name}`: only `include_usage` is supported"),
                    ));
                }
                match include {
                    Value::Null => false,
                    Value::Bool(b) => b,
                    _ => {
                        return Err(ApiError::invalid(
                            Some("stream_options"),
                            "`stream_options.include_usage` must be true or false",
                        ))
                    }
                }
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    Some("stream_options"),
                    "`stream_options` must be an object",
                ))
            }
        };
        let top_k = match fields.integer("top_k")? {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k as usize),
            Some(_) => {
                return Err(ApiError::invalid(
                    Some("top_k"),
                    "`top_k` must be a whole number >= 1 (0 or -1 turn it off)",
                ))
            }
        };
        let max_tokens = fields.count("max_tokens")?;
        let max_completion_tokens = fields.count("max_completion_tokens")?;
        let seed = match fields.integer("seed")? {
            None => None,
            // OpenAI's seeds are signed; any one picks a stream of draws.
            Some(seed) => Some(seed as u64),
        };
        Ok(Self {
            endpoint: Some(endpoint),
            stream: fields.bool("stream")?.unwrap_or(false),
            include_usage,
            temperature: fields.number("temperature")?,
            top_p: fields.number("top_p")?,
            top_k,
            max_tokens: max_completion_tokens.or(max_tokens),
            stop: stop_strings(fields.take("stop"))?,
            seed,
            ignore_eos: fields.bool("ignore_eos")?.unwrap_or(false),
            repetition_penalty: fields.number("repetition_penalty")?.map(|p| p as f32),
            frequency_penalty: fields.number("frequency_penalty")?.unwrap_or(0.0) as f32,
            presence_penalty: fields.number("presence_penalty")?.unwrap_or(0.0) as f32,
            logit_bias: logit_bias(fields.take("logit_bias"))?,
            speculative: fields.bool("speculative")?,
            lookahead: fields.string("lookahead")?,
            early_exit: fields.string("early_exit")?,
        })
    }

    /// Whether a penalty or bias that depends on the tokens so far is asked for.
    fn adjusts_logits(&self) -> bool {
        self.repetition_penalty.is_some_and(|p| p != 1.0)
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
            || !self.logit_bias.is_empty()
    }

    /// The field of the first such penalty or bias, for errors.
    fn logit_adjustment_field(&self) -> &'static str {
        if self.repetition_penalty.is_some_and(|p| p != 1.0) {
            "repetition_penalty"
        } else if self.frequency_penalty != 0.0 {
            "frequency_penalty"
        } else if self.presence_penalty != 0.0 {
            "presence_penalty"
        } else {
            "logit_bias"
        }
    }
}

fn stop_strings(stop: Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid(
            Some("stop"),
            "`stop` must be a string or a list of up to 4 strings",
        )
    };
    match stop {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) if items.len() <= 4 => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// OpenAI's `logit_bias`: an object from token ids (as strings) to numbers.
fn logit_bias(bias: Option<Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = |m: String| ApiError::invalid(Some("logit_bias"), m);
    let Some(bias) = bias else {
        return Ok(Vec::new());
    };
    let Value::Object(entries) = bias else {
        return Err(bad(
            "`logit_bias` must be an object from token ids to biases, e.g. {\"1234\": -100}".into(),
        ));
    };
    entries
        .iter()
        .map(|(id, value)| {
            let id: u32 = id
                .trim()
                .parse()
                .map_err(|_| bad(format!("`logit_bias` key `{id}` is not a token id")))?;
            match value.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(bad(format!(
                    "`logit_bias` for token {id} must be a number from -100 to 100"
                ))),
            }
        })
        .collect()
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

/// Refuses, before any tokenizing, a prompt of `bytes` bytes of text that cannot fit the
/// context: it has at least `bytes / text_bytes_per_token` tokens ([`ModelInfo`]).
pub fn check_prompt_bytes(
    bytes: usize,
    info: &ModelInfo,
    endpoint: Endpoint,
) -> Result<(), ApiError> {
    let Some(per_token) = info.text_bytes_per_token else {
        return Ok(());
    };
    let fewest_tokens = bytes / per_token.max(1);
    if fewest_tokens >= info.context_length {
        let field = endpoint.prompt_field();
        return Err(ApiError::invalid(
            Some(field),
            format!(
                "the prompt is {bytes} bytes, at least {fewest_tokens} tokens, but the model's context holds {} tokens: shorten `{field}`",
                info.context_length
            ),
        )
        .with_code(400, "context_length_exceeded"));
    }
    Ok(())
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

/// The conversation of a chat request (its `messages` field).
pub fn chat_messages(messages: Option<Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |m: String| ApiError::invalid(Some("messages"), m);
    let messages = match messages {
        None => return Err(bad("`messages` is missing: send the conversation".into())),
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(bad("`messages` is empty: send at least one message".into()))
        }
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad("`messages` must be a list of messages".into())),
    };
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(mut m) = m else {
                return Err(bad(format!(
                    "`messages[{i}]` must be an object with `role` and `content`"
                )));
            };
            let role = match m.remove("role") {
                Some(Value::String(role)) => role,
                _ => return Err(bad(format!("`messages[{i}].role` must be a string"))),
            };
            if !matches!(role.as_str(), "system" | "developer" | "user" | "assistant") {
                return Err(bad(format!(
                    "`messages[{i}].role` is `{role}`: use system, user or assistant"
                )));
            }
            let content = message_text(i, m.remove("content").unwrap_or(Value::Null))?;
            // A participant's name does not reach these chat templates; it changes nothing.
            m.remove("name");
            if let Some((name, _)) = m.iter().find(|(_, v)| !v.is_null()) {
                return Err(bad(format!(
                    "`messages[{i}].{name}` is not supported (tool calls and refusals are not)"
                )));
            }
            // OpenAI's newer name for the system role.
            let role = if role == "developer" { "system" } else { &role };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn message_text(index: usize, content: Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type"), p.get("text")) {
                (Some(Value::String(t)), Some(Value::String(text))) if t == "text" => {
                    Ok(text.as_str())
                }
                _ => Err(ApiError::invalid(
                    Some("messages"),
                    format!("`messages[{index}].content`: only text parts (`{{\"type\": \"text\", \"text\": ...}}`) are supported"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|texts| texts.concat()),
        _ => Err(ApiError::invalid(
            Some("messages"),
            format!("`messages[{index}].content` must be a string or a list of text parts"),
        )),
    }
}

/// The bytes of text a chat request's messages hold (for [`check_prompt_bytes`]).
pub fn chat_bytes(messages: &[ChatMessage]) -> usize {
    messages.iter().map(|m| m.content.len()).sum()
}

/// The prompt of a completion request: text to encode, or token ids as given.
#[derive(Debug)]
pub enum PromptInput {
    /// Text, encoded with the model's tokenizer.
    Text(String),
    /// Token ids, used as they are.
    Ids(Vec<u32>),
}

/// Reads a completion's `prompt`: a string, a list of one string, or a list of token ids;
/// several prompts are refused.
pub fn completion_prompt(prompt: Option<Value>) -> Result<PromptInput, ApiError> {
    let bad = |m: &str| ApiError::invalid(Some("prompt"), m);
    match prompt {
        None => Err(bad("`prompt` is missing: send the text to continue")),
        Some(Value::String(s)) => Ok(PromptInput::Text(s)),
        Some(Value::Array(mut items)) if items.len() == 1 && items[0].is_string() => {
            match items.pop() {
                Some(Value::String(s)) => Ok(PromptInput::Text(s)),
                _ => Err(bad("`prompt` must be a string")),
            }
        }
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_u64) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| bad("token ids must fit in 32 bits"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(PromptInput::Ids),
        Some(Value::Array(items)) if items.len() > 1 => Err(bad(
            "one prompt per request: send several requests to complete several prompts",
        )),
        Some(_) => Err(bad(
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
    let prompt_field = params.endpoint.unwrap_or(Endpoint::Chat).prompt_field();
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid(
            Some(prompt_field),
            "the prompt is empty: give some text to continue",
        ));
    }
    if let Some(bad) = prompt_ids
        .iter()
        .find(|&&id| id as usize >= info.tokenizer.vocab_size())
    {
        return Err(ApiError::invalid(
            Some(prompt_field),
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
            Some(prompt_field),
            format!(
                "the prompt is {prompt_tokens} tokens but the model's context holds {context}: shorten `{prompt_field}`"
            ),
        )
        .with_code(400, "context_length_exceeded"));
    }
    let max_tokens = match params.max_tokens {
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
                    "this model's context holds {context} tokens, but {} were requested ({prompt_tokens} in the prompt, {n} to generate): lower `max_tokens` or shorten `{prompt_field}`",
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
    if let Some(p) = params.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                Some("top_p"),
                "`top_p` must be greater than 0 and at most 1",
            ));
        }
    }
    if let Some(&(id, _)) = params
        .logit_bias
        .iter()
        .find(|(id, _)| *id as usize >= info.tokenizer.vocab_size())
    {
        return Err(ApiError::invalid(
            Some("logit_bias"),
            format!(
                "`logit_bias` names token {id}, outside the vocabulary of {} tokens",
                info.tokenizer.vocab_size()
            ),
        ));
    }
    let sampling = SamplingParams {
        // Below 1e-5 sampling is greedy (vLLM's rule): dividing by it would overflow.
        temperature: if temperature < GREEDY_BELOW {
            0.0
        } else {
            temperature
        },
        top_k: params.top_k,
        top_p: params.top_p.filter(|&p| p < 1.0),
        repetition_penalty: params.repetition_penalty.unwrap_or(1.0),
        repeat_last_n: 64,
        frequency_penalty: params.frequency_penalty,
        presence_penalty: params.presence_penalty,
        logit_bias: params.logit_bias.clone(),
        seed: params.seed.unwrap_or_else(random_seed),
    };
    sampling.validate().map_err(setting_error)?;
    let dynamic = dynamic_options(params, info)?;
    Ok(Prepared {
        prompt_ids,
        options: GenerateOptions {
            max_tokens,
            sampling,
            stop_at_eos: !params.ignore_eos,
        },
        stop: params.stop.clone(),
        dynamic,
        stream: params.stream,
        include_usage: params.include_usage,
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
                    "this server has no exit adapters, so it cannot honour `early_exit`",
                ));
            }
            Some(policy)
        }
    };
    let asked = params.speculative == Some(true) || params.lookahead.is_some();
    let wants_speculative = match (params.speculative, &params.lookahead) {
        (Some(false), Some(_)) => {
            return Err(ApiError::invalid(
                Some("lookahead"),
                "`lookahead` needs speculative decoding, but `speculative` is false",
            ))
        }
        (Some(on), _) => on,
        (None, Some(_)) => true,
        // By default a server with a draft drafts, except for requests whose sampling it
        // cannot verify drafts under (penalties, bias) and early-exit ones: those decode
        // plainly, and the response reports no speculation.
        (None, None) => info.draft.is_some() && early_exit.is_none() && !params.adjusts_logits(),
    };
    if wants_speculative && early_exit.is_some() {
        return Err(ApiError::invalid(
            Some("early_exit"),
            "`early_exit` cannot be combined with speculative decoding: send `\"speculative\": false`",
        ));
    }
    if asked && params.adjusts_logits() {
        let field = params.logit_adjustment_field();
        return Err(ApiError::invalid(
            Some(field),
            format!("`{field}` cannot be combined with speculative decoding yet: send `\"speculative\": false`"),
        ));
    }
    let speculative = match (wants_speculative, &info.draft) {
        (false, _) => None,
        (true, None) => {
            return Err(ApiError::invalid(
                Some("speculative"),
                "this server has no draft model, so it cannot decode speculatively",
            ))
        }
        (true, Some(_)) => {
            let lookahead = params.lookahead.clone().unwrap_or(info.lookahead.clone());
            // A DISCO lookahead names a file: a request may only use the server's own.
            if lookahead.starts_with("disco") && lookahead != info.lookahead {
                return Err(ApiError::invalid(
                    Some("lookahead"),
                    "a request cannot load a DISCO classifier: use fixed:K, heuristic[:START] or confidence[:THRESHOLD], or leave `lookahead` out for the server's own",
                ));
            }
            dynexec_spec::lookahead::parse(&lookahead).map_err(setting_error)?;
            Some(lookahead)
        }
    };
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
        assert_eq!((e.status, e.param.as_deref()), (400, Some("top_p")));
        assert_eq!(e.message, "`top_p` must be in (0, 1]");
        let e = setting_error(Error::BadSpec {
            setting: Setting::Lookahead,
            spec: "sometimes".into(),
            help: "use fixed:K".into(),
        });
        assert_eq!(e.param.as_deref(), Some("lookahead"));
        assert_eq!(e.message, "bad `lookahead` `sometimes`: use fixed:K");
        let e = setting_error(Error::setting(Setting::BatchSize, "must be at least 1"));
        assert_eq!(e.param, None);
        assert_eq!(e.message, "the batch size must be at least 1");
    }

    /// Fields are read by name with their types named in errors; neutral values of
    /// unsupported options pass, others and unknown fields are refused by name.
    #[test]
    fn fields_are_typed_and_nothing_is_ignored() {
        let parse = |body: &str| CompletionRequest::parse(body.as_bytes());
        let request = parse(
            r#"{"prompt": "hi", "max_tokens": 4.0, "top_k": -1, "seed": -7,
            "stop": ["a"], "logit_bias": {"12": -100}, "user": "x", "echo": false,
            "response_format": {"type": "text"}, "n": 1, "tools": null}"#,
        )
        .unwrap();
        assert_eq!(request.params.max_tokens, Some(4));
        assert_eq!(request.params.top_k, None);
        assert_eq!(request.params.logit_bias, vec![(12, -100.0)]);
        assert_eq!(request.params.endpoint, Some(Endpoint::Completion));
        for (body, param, needle) in [
            (
                r#"{"prompt": "hi", "max_tokens": -1}"#,
                "max_tokens",
                "whole number >= 0",
            ),
            (
                r#"{"prompt": "hi", "temperature": "hot"}"#,
                "temperature",
                "must be a number",
            ),
            (r#"{"prompt": "hi", "echo": true}"#, "echo", "echoing"),
            (
                r#"{"prompt": "hi", "response_format": {"type": "json_object"}}"#,
                "response_format",
                "structured",
            ),
            (
                r#"{"prompt": "hi", "frobnicate": 1}"#,
                "frobnicate",
                "unknown field",
            ),
            (
                r#"{"prompt": "hi", "logit_bias": {"x": 1}}"#,
                "logit_bias",
                "not a token id",
            ),
            (
                r#"{"prompt": "hi", "stream_options": {"chunks": 2}}"#,
                "stream_options",
                "include_usage",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert!(e.message.contains(needle), "{body}: {}", e.message);
            assert!(
                !e.message.contains("u64") && !e.message.contains("f64"),
                "{}",
                e.message
            );
        }
        assert!(parse("[1]").unwrap_err().message.contains("JSON object"));
        let e = ChatRequest::parse(
            br#"{"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}"#,
        )
        .unwrap_err();
        assert!(
            e.message.contains("messages[0].tool_calls"),
            "{}",
            e.message
        );
    }
}
