//! The OpenAI request bodies, their checks, and the error bodies clients understand.
//!
//! Every field is read by name ([`Fields`]), so errors name the JSON field and say what it
//! must be. Nothing that would change the answer is ignored: a field dynexec implements is
//! honoured, one it does not (`response_format`, `tool_choice`, `echo`, `best_of`, ...) is
//! refused with a 400 naming it unless it holds its neutral value (`{"type": "text"}`,
//! `"none"`, `false`, `1`), and an unknown field is refused too. Only fields that cannot
//! change the answer (`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`)
//! are accepted and ignored.

use crate::engine::{Dynamic, ModelInfo, TraceRequest};
use crate::traces::bytes_needed;
use dynexec_core::sampling::{SamplingParams, GREEDY_BELOW};
use dynexec_core::Setting;
use dynexec_exit::token_exit::{ExitMeasure, TokenExitPolicy};
use dynexec_models::generation::GenerateOptions;
use serde_json::Value;

mod fields;
mod request;

pub use fields::Fields;
pub use request::{
    chat_bytes, chat_messages, completion_prompt, ChatRequest, CompletionRequest, Endpoint, Params,
    PromptInput,
};

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
    /// The byte quota of the server's trace folder; `None` when the server saves no traces.
    pub trace_quota: Option<u64>,
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
    let mut dynamic = dynamic_options(params, &sampling, info)?;
    dynamic.trace = trace_request(params, info, limits, prompt_tokens + max_tokens)?;
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
fn dynamic_options(
    params: &Params,
    sampling: &SamplingParams,
    info: &ModelInfo,
) -> Result<Dynamic, ApiError> {
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
            if policy.measure == ExitMeasure::Classifier && !info.exit_classifiers {
                return Err(ApiError::invalid(
                    Some("early_exit"),
                    "this server's exit adapters carry no exit classifiers: use `confidence:T` or `saturation:T`",
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
        (None, None) => info.draft.is_some() && early_exit.is_none() && !sampling.adjusts_logits(),
    };
    if wants_speculative && early_exit.is_some() {
        return Err(ApiError::invalid(
            Some("early_exit"),
            "`early_exit` cannot be combined with speculative decoding: send `\"speculative\": false`",
        ));
    }
    if let Some(setting) = sampling.logit_adjustment().filter(|_| asked) {
        return Err(setting_error(dynexec_core::Error::setting(
            setting,
            "cannot be combined with speculative decoding yet: send `\"speculative\": false`",
        )));
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
        cache_prompt: params.cache_prompt,
        // The handler scopes it to the caller ([`cache_scope`]).
        cache_scope: 0,
        trace: None,
    })
}

/// The trace a request asked for, checked against the model and the server's quota: one
/// that could never fit is refused before it runs. (The engine reserves its memory under the
/// same quota when it starts.) The name is set later.
fn trace_request(
    params: &Params,
    info: &ModelInfo,
    limits: Limits,
    positions: usize,
) -> Result<Option<TraceRequest>, ApiError> {
    let Some(asked) = &params.trace else {
        return Ok(None);
    };
    let invalid = |m: String| ApiError::invalid(Some("dynexec"), m);
    let Some(quota) = limits.trace_quota else {
        return Err(invalid(
            "this server saves no traces: start it with `dynexec serve --trace-dir DIR`".into(),
        ));
    };
    if params.early_exit.is_some() {
        return Err(invalid(
            "`dynexec.trace` cannot be combined with `early_exit` yet (exited tokens skip layers): trace without it".into(),
        ));
    }
    let top = info.num_layers;
    let mut layers = asked.layers.clone().unwrap_or_else(|| (0..=top).collect());
    if let Some(bad) = layers.iter().find(|&&l| l > top) {
        return Err(invalid(format!(
            "`dynexec.trace.layers` names layer {bad}, but the model has {top} (0 = embeddings, {top} = the last)"
        )));
    }
    layers.sort_unstable();
    layers.dedup();
    let bytes = bytes_needed(layers.len(), positions, info.hidden_size);
    if bytes > quota {
        return Err(invalid(format!(
            "a trace of {} layers over up to {positions} positions would take {bytes} bytes, more than the server's trace quota of {quota}: trace fewer layers (`dynexec.trace.layers`) or lower `max_tokens`",
            layers.len()
        )));
    }
    Ok(Some(TraceRequest {
        layers,
        name: String::new(),
    }))
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

/// The prefix-cache scope of a request: its API key and `cache_salt`, hashed (the same for
/// every request of one client, different across clients).
pub fn cache_scope(headers: &axum::http::HeaderMap, salt: Option<&str>) -> u64 {
    use std::hash::{Hash, Hasher};
    let key = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (key, salt).hash(&mut hasher);
    hasher.finish()
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
