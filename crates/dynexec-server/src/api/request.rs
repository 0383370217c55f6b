//! The two request bodies, chat and completion, and the parameters they share.

use super::fields::Fields;
use super::ApiError;
use dynexec_core::tokenizer::ChatMessage;
use serde_json::Value;

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
    /// dynexec: per-token early exit, e.g. `classifier:0.9` or `confidence:0.9`.
    pub early_exit: Option<String>,
    /// llama-server's: reuse the longest cached prefix of the prompt (default true).
    pub cache_prompt: bool,
    /// vLLM's: requests reuse only cached prefixes left by requests with the same salt.
    pub cache_salt: Option<String>,
    /// dynexec: save the request's residual stream (`"dynexec": {"trace": ...}`).
    pub trace: Option<TraceParams>,
}

/// `"dynexec": {"trace": true}` or `{"trace": {"layers": [0, 14, 28]}}`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TraceParams {
    /// Layers to record (0 = embeddings); every layer when left out.
    pub layers: Option<Vec<usize>>,
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
            cache_prompt: fields.bool("cache_prompt")?.unwrap_or(true),
            cache_salt: fields.string("cache_salt")?,
            trace: dynexec_options(fields.take("dynexec"))?,
        })
    }
}

/// dynexec's own options object: `{"trace": true | false | {"layers": [...]}}`.
fn dynexec_options(options: Option<Value>) -> Result<Option<TraceParams>, ApiError> {
    let bad = |m: &str| ApiError::invalid(Some("dynexec"), m);
    let Some(options) = options.filter(|o| !o.is_null()) else {
        return Ok(None);
    };
    let Value::Object(mut options) = options else {
        return Err(bad(
            "`dynexec` must be an object, e.g. {\"trace\": {\"layers\": [0, 14, 28]}}",
        ));
    };
    let trace = options.remove("trace");
    if let Some(name) = options.keys().next() {
        return Err(ApiError::invalid(
            Some("dynexec"),
            format!("unknown field `dynexec.{name}`: only `trace` is supported"),
        ));
    }
    let layers_error =
        "`dynexec.trace.layers` must be a list of layer numbers (0 = embeddings), e.g. [0, 14, 28]";
    match trace {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
        Some(Value::Bool(true)) => Ok(Some(TraceParams::default())),
        Some(Value::Object(mut trace)) => {
            let layers = match trace.remove("layers") {
                None | Some(Value::Null) => None,
                Some(Value::Array(items)) if !items.is_empty() => Some(
                    items
                        .iter()
                        .map(|v| {
                            v.as_u64()
                                .map(|l| l as usize)
                                .ok_or_else(|| bad(layers_error))
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                Some(_) => return Err(bad(layers_error)),
            };
            if let Some(name) = trace.keys().next() {
                return Err(ApiError::invalid(
                    Some("dynexec"),
                    format!("unknown field `dynexec.trace.{name}`: only `layers` is supported"),
                ));
            }
            Ok(Some(TraceParams { layers }))
        }
        Some(_) => Err(bad(
            "`dynexec.trace` must be true, false or an object such as {\"layers\": [0, 14, 28]}",
        )),
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
