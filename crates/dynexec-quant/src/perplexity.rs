//! Sliding-window perplexity, as transformers' guide computes it: windows of `context`
//! tokens advance by `stride`; each window scores only the tokens the previous one did not,
//! with the rest of the window as context.

use candle_core::{DType, Tensor, D};
use dynexec_core::{Error, Result, Setting};
use dynexec_models::llama::Llama;
use serde::Serialize;

/// Result of a perplexity evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Tokens scored: all but the first, less each window's first token when stride = context.
    pub tokens: usize,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
}

/// Window settings.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Tokens per window, at least 2 and at most the model's context.
    pub context: usize,
    /// Tokens each window advances by, in `1..=context`.
    pub stride: usize,
}

impl Window {
    /// Checks the ranges above against a model whose context is `model_context` tokens; the
    /// error names the setting at fault.
    pub fn validate(&self, model_context: usize) -> Result<()> {
        if self.context < 2 {
            return Err(Error::setting(
                Setting::PerplexityContext,
                format!("must be >= 2, not {}", self.context),
            ));
        }
        if self.stride == 0 || self.stride > self.context {
            return Err(Error::setting(
                Setting::PerplexityStride,
                format!(
                    "must be in 1..={} (the window), not {}",
                    self.context, self.stride
                ),
            ));
        }
        if self.context > model_context {
            return Err(Error::setting(
                Setting::PerplexityContext,
                format!(
                    "{} is longer than the model's context of {model_context}",
                    self.context
                ),
            ));
        }
        Ok(())
    }
}

/// Perplexity of `model` on `tokens`; `progress(done, total)` is called after each window.
pub fn perplexity(
    model: &Llama,
    tokens: &[u32],
    window: Window,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    window.validate(model.config().context_length)?;
    if tokens.len() < 2 {
        return Err(Error::InvalidArgument(
            "the text has fewer than 2 tokens: nothing to score".to_string(),
        ));
    }
    let total = tokens.len() - 1;
    let mut nll_sum = 0f64;
    let mut scored = 0usize;
    for span in schedule(tokens.len(), window) {
        let input = &tokens[span.begin..span.end - 1];
        let targets = &tokens[span.first_target..span.end];
        let mut cache = model.new_cache();
        let logits = model.forward(input, &mut cache, None)?; // (len, vocab)
                                                              // Logits at local position j predict token begin + j + 1.
        let logits = logits.narrow(0, span.first_target - 1 - span.begin, targets.len())?;
        nll_sum += window_nll(&logits, targets)?;
        scored += targets.len();
        progress(span.end - 1, total);
    }
    let mean_nll = nll_sum / scored as f64;
    Ok(Perplexity {
        perplexity: mean_nll.exp(),
        tokens: scored,
        mean_nll,
    })
}

/// One window: tokens `begin..end` are the context, `first_target..end` are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    begin: usize,
    end: usize,
    first_target: usize,
}

/// The windows over `n` tokens: each scores the tokens the previous one did not reach (a
/// window's first token has no context, so it is never a target).
fn schedule(n: usize, window: Window) -> Vec<Span> {
    let mut spans = Vec::new();
    let (mut begin, mut prev_end) = (0, 0);
    loop {
        let end = (begin + window.context).min(n);
        let first_target = prev_end.max(begin + 1);
        // A last window holding a single new token has nothing it can score.
        if first_target < end {
            spans.push(Span {
                begin,
                end,
                first_target,
            });
        }
        if end == n {
            return spans;
        }
        prev_end = end;
        begin += window.stride;
    }
}

/// Sum of -log p(target) over rows; computed on the device, one scalar comes back.
fn window_nll(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let picked = log_probs.gather(&idx, 1)?;
    Ok(-(picked.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(begin: usize, end: usize, first_target: usize) -> Span {
        Span {
            begin,
            end,
            first_target,
        }
    }

    #[test]
    fn overlapping_windows_score_every_token_but_the_first_once() {
        let spans = schedule(
            10,
            Window {
                context: 4,
                stride: 2,
            },
        );
        assert_eq!(
            spans,
            vec![span(0, 4, 1), span(2, 6, 4), span(4, 8, 6), span(6, 10, 8)]
        );
        let scored: usize = spans.iter().map(|s| s.end - s.first_target).sum();
        assert_eq!(scored, 9);
    }

    #[test]
    fn disjoint_windows_skip_each_window_s_first_token() {
        let spans = schedule(
            9,
            Window {
                context: 4,
                stride: 4,
            },
        );
        assert_eq!(spans, vec![span(0, 4, 1), span(4, 8, 5)]);
    }

    #[test]
    fn bad_windows_are_refused() {
        assert!(Window {
            context: 1,
            stride: 1
        }
        .validate(100)
        .is_err());
        assert!(Window {
            context: 8,
            stride: 9
        }
        .validate(100)
        .is_err());
        assert!(Window {
            context: 200,
            stride: 10
        }
        .validate(100)
        .is_err());
        assert!(Window {
            context: 8,
            stride: 8
        }
        .validate(100)
        .is_ok());
    }
}
