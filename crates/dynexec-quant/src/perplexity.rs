//! Sliding-window perplexity, as transformers' guide computes it: windows of `context`
//! tokens advance by `stride`; each window scores only the tokens the previous one did not,
//! with the rest of the window as context.

use candle_core::{DType, Tensor, D};
use dynexec_core::{Error, Result};
use dynexec_models::llama::Llama;
use serde::Serialize;

/// Result of a perplexity evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub perplexity: f64,
    /// Tokens scored: all but the first, less each window's first token when stride = context.
    pub tokens: usize,
    pub mean_nll: f64,
}

/// Window settings.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub context: usize,
    pub stride: usize,
}

impl Window {
    pub fn validate(&self, model_context: usize) -> Result<()> {
        if self.context < 2 || self.stride == 0 || self.stride > self.context {
            return Err(Error::InvalidArgument(
                "--context must be >= 2 and --stride in 1..=context".to_string(),
            ));
        }
        if self.context > model_context {
            return Err(Error::InvalidArgument(format!(
                "--context {} is longer than the model's context of {model_context}",
                self.context
            )));
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
    let mut prev_end = 0usize;
    let mut begin = 0usize;
    loop {
        let end = (begin + window.context).min(tokens.len());
        // Tokens scored here: those the previous window did not reach (the window's first
        // token has no context, so it is never a target).
        let first_target = prev_end.max(begin + 1);
        let input = &tokens[begin..end - 1];
        let targets = &tokens[first_target..end];
        let mut cache = model.new_cache();
        let logits = model.forward(input, &mut cache, None)?; // (len, vocab)
        let logits = logits.narrow(0, first_target - 1 - begin, targets.len())?;
        nll_sum += window_nll(&logits, targets)?;
        scored += targets.len();
        prev_end = end;
        progress(end - 1, total);
        if end == tokens.len() {
            break;
        }
        begin += window.stride;
    }
    let mean_nll = nll_sum / scored as f64;
    Ok(Perplexity {
        perplexity: mean_nll.exp(),
        tokens: scored,
        mean_nll,
    })
}

/// Sum of -log p(target) over rows; computed on the device, one scalar comes back.
fn window_nll(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let picked = log_probs.gather(&idx, 1)?;
    Ok(-(picked.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?))
}
