//! Reading a JSON body field by field: each field's type is checked and named in errors, and
//! whatever is left at the end is refused unless it cannot change the answer.

use super::ApiError;
use serde_json::Value;

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
