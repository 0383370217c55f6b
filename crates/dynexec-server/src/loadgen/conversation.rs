//! What prefix caching saves a multi-turn chat: one conversation whose every turn is sent
//! twice, first reusing the server's cached prefix, then with `cache_prompt: false`, and
//! each turn's time to first token compared (`bench serve --chat-turns N`).

use super::{percentile, stream_to, LoadError, Target};
use serde::Serialize;
use serde_json::{json, Value};

/// The user's turns after the first question: general follow-ups any answer admits.
pub const FOLLOW_UPS: [&str; 7] = [
    "Can you explain that in more detail?",
    "Give me a concrete example.",
    "What is a common mistake people make with this?",
    "How would you summarize it for a beginner?",
    "What should I read next to learn more?",
    "Is there a simpler way to put it?",
    "Thanks. One last question: why does it matter?",
];

/// One turn of the conversations, over every conversation run.
#[derive(Debug, Clone, Serialize)]
pub struct ConversationRow {
    /// The turn, from 1.
    pub turn: usize,
    /// Prompt tokens of the turn (the conversation so far), median over conversations.
    pub prompt_tokens: f64,
    /// Of those, the tokens the warm request took from the cache, median.
    pub cached_tokens: f64,
    /// Time to first token reusing the cached prefix, median ms.
    pub ttft_ms_reused: f64,
    /// Time to first token with `cache_prompt: false`, median ms.
    pub ttft_ms_cold: f64,
    /// Cold over reused.
    pub speedup: f64,
    /// Whether the reused and the cold answers were the same text in every conversation.
    pub same_answer: bool,
}

impl Target {
    /// Runs `conversations` conversations of `turns` turns (the first opening with
    /// `openers[i]`, then [`FOLLOW_UPS`]), each turn sent warm then cold, and reports each
    /// turn's time to first token both ways. Answers are greedy and `max_tokens` long at most.
    pub fn conversation(
        &self,
        openers: &[String],
        turns: usize,
        conversations: usize,
        max_tokens: usize,
    ) -> Result<Vec<ConversationRow>, LoadError> {
        if turns == 0 || turns > FOLLOW_UPS.len() + 1 || openers.is_empty() {
            return Err(LoadError::Request(format!(
                "a conversation has 1 to {} turns and needs an opening prompt",
                FOLLOW_UPS.len() + 1
            )));
        }
        // Per turn: (prompt, cached, warm ttft, cold ttft, same answer), one per conversation.
        let mut per_turn: Vec<Vec<(f64, f64, f64, f64, bool)>> = vec![Vec::new(); turns];
        for c in 0..conversations {
            let mut messages: Vec<Value> = Vec::new();
            for (turn, samples) in per_turn.iter_mut().enumerate() {
                let user = match turn {
                    0 => openers[c % openers.len()].as_str(),
                    n => FOLLOW_UPS[n - 1],
                };
                messages.push(json!({"role": "user", "content": user}));
                let body = |cache: bool| {
                    json!({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                        "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
                        "speculative": false, "cache_prompt": cache})
                };
                // Warm first: a cold request's cache would otherwise hold this very prompt.
                let warm = stream_to(&self.base, "/v1/chat/completions", &body(true))?;
                let cold = stream_to(&self.base, "/v1/chat/completions", &body(false))?;
                samples.push((
                    warm.prompt_tokens as f64,
                    warm.cached_tokens as f64,
                    warm.ttft * 1000.0,
                    cold.ttft * 1000.0,
                    warm.text == cold.text,
                ));
                messages.push(json!({"role": "assistant", "content": warm.text}));
            }
        }
        Ok(per_turn
            .iter()
            .enumerate()
            .map(|(turn, samples)| {
                let median = |f: fn(&(f64, f64, f64, f64, bool)) -> f64| {
                    percentile(&samples.iter().map(f).collect::<Vec<_>>(), 50.0)
                };
                let (reused, cold) = (median(|s| s.2), median(|s| s.3));
                ConversationRow {
                    turn: turn + 1,
                    prompt_tokens: median(|s| s.0),
                    cached_tokens: median(|s| s.1),
                    ttft_ms_reused: reused,
                    ttft_ms_cold: cold,
                    speedup: if reused > 0.0 { cold / reused } else { 0.0 },
                    same_answer: samples.iter().all(|s| s.4),
                }
            })
            .collect())
    }
}
