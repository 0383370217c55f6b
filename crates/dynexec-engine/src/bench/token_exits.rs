//! The per-token early-exit benchmark: each policy next to full-depth decoding of the same
//! decoder — agreement with full-depth greedy tokens, identical outputs, perplexity, layers
//! used and decoding speed (full depth re-measured next to every policy).

use crate::{decode, mean, Strategy};
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::Result;
use dynexec_exit::token_exit::{ExitAdapters, TokenExit, TokenExitPolicy};
use dynexec_models::generation::{generate, GenerateOptions};
use dynexec_models::llama::Llama;
use serde::Serialize;

/// One policy's quality and speed; the first row is full depth.
#[derive(Debug, Clone, Serialize)]
pub struct TokenExitRow {
    /// The policy (`full` for full depth).
    pub policy: String,
    /// Share of decoding steps, fed the full-depth greedy tokens, whose top token is the
    /// full-depth one.
    pub agreement: f64,
    /// Prompts whose free-running output equals full-depth decoding's.
    pub identical_outputs: usize,
    /// Mean layer tokens left at.
    pub mean_exit_layer: f64,
    /// Share of layers skipped, in percent.
    pub layers_saved_pct: f64,
    /// Decode tokens/s of free-running generation.
    pub decode_tokens_per_s: f64,
    /// Over full-depth decoding of the same prompts, interleaved prompt by prompt.
    pub speedup: f64,
    /// Perplexity of the held-out text, one decoding step per token.
    pub perplexity: f64,
    /// Perplexity over full depth's, minus one, in percent.
    pub perplexity_delta_pct: f64,
}

/// Runs full depth, then every policy, on the chat `prompts` (token ids) and the held-out
/// `text_ids`; `on_policy` hears each finished policy.
#[allow(clippy::too_many_arguments)]
pub fn bench_token_exits(
    model: &Llama,
    tokenizer: &TextTokenizer,
    adapters: &ExitAdapters,
    policies: &[TokenExitPolicy],
    prompts: &[Vec<u32>],
    text_ids: &[u32],
    options: &GenerateOptions,
    mut on_policy: impl FnMut(&str),
) -> Result<Vec<TokenExitRow>> {
    // Full depth first: its greedy tokens are the reference.
    let mut reference = Vec::new();
    for p in prompts {
        reference.push(generate(model, tokenizer, p, options, None, |_| Ok(()))?.token_ids);
    }
    let full_ppl = perplexity(model, None, text_ids)?;
    on_policy("full");
    let depth = model.num_layers();
    // Full-depth speed is measured again next to every policy, prompt by prompt, so each
    // speedup compares runs minutes (not tens of minutes) apart on this noisy machine.
    let (mut all_full_secs, mut all_full_tokens) = (0.0, 0);
    let mut rows = Vec::new();
    for &policy in policies {
        // Agreement: teacher-forced on the full-depth tokens.
        let mut agree = 0;
        let mut steps = 0;
        for (p, tokens) in prompts.iter().zip(&reference) {
            // One stepper per sequence: deferred positions belong to their own cache.
            let mut exit = TokenExit::new(model, adapters, policy)?;
            let mut cache = model.new_cache();
            exit.step(p, &mut cache)?;
            for pair in tokens.windows(2) {
                let logits = exit.step(&pair[..1], &mut cache)?;
                agree += usize::from(Llama::argmax_rows(&logits.unsqueeze(0)?)?[0] == pair[1]);
                steps += 1;
            }
        }
        // Speed and identical outputs: free-running generation, interleaved with full depth.
        let mut layers = Vec::new();
        let (mut secs, mut tokens, mut identical) = (0.0, 0, 0);
        let (mut full_secs, mut full_tokens) = (0.0, 0);
        for (p, reference) in prompts.iter().zip(&reference) {
            let full = generate(model, tokenizer, p, options, None, |_| Ok(()))?;
            full_secs += full.stats.decode_secs;
            full_tokens += full.stats.generated_tokens.saturating_sub(1);
            let mut strategy = Strategy::EarlyExit { adapters, policy };
            let decoded = decode(
                model,
                tokenizer,
                p,
                options,
                &mut strategy,
                None,
                |_| Ok(()),
            )?;
            if let Some(report) = decoded.report.early_exit {
                layers.extend(report.exit_layers);
            }
            let out = decoded.generation;
            secs += out.stats.decode_secs;
            tokens += out.stats.generated_tokens.saturating_sub(1);
            identical += usize::from(&out.token_ids == reference);
        }
        let mut scoring = TokenExit::new(model, adapters, policy)?;
        let ppl = perplexity(model, Some(&mut scoring), text_ids)?;
        layers.extend_from_slice(&scoring.exit_layers);
        let mean_exit = mean(&layers);
        let speed = tokens as f64 / secs.max(1e-9);
        let full_speed = full_tokens as f64 / full_secs.max(1e-9);
        all_full_secs += full_secs;
        all_full_tokens += full_tokens;
        rows.push(TokenExitRow {
            policy: policy.to_string(),
            agreement: agree as f64 / steps.max(1) as f64,
            identical_outputs: identical,
            mean_exit_layer: mean_exit,
            layers_saved_pct: 100.0 * (1.0 - mean_exit / depth as f64),
            decode_tokens_per_s: speed,
            speedup: speed / full_speed,
            perplexity: ppl,
            perplexity_delta_pct: 100.0 * (ppl / full_ppl - 1.0),
        });
        on_policy(&policy.to_string());
    }
    rows.insert(
        0,
        TokenExitRow {
            policy: "full".into(),
            agreement: 1.0,
            identical_outputs: prompts.len(),
            mean_exit_layer: depth as f64,
            layers_saved_pct: 0.0,
            decode_tokens_per_s: all_full_tokens as f64 / all_full_secs.max(1e-9),
            speedup: 1.0,
            perplexity: full_ppl,
            perplexity_delta_pct: 0.0,
        },
    );
    Ok(rows)
}

/// Perplexity of `ids[1..]`, scoring one token per decoding step (so early exit applies to
/// every position, as in generation); `exit: None` runs full depth.
fn perplexity(model: &Llama, mut exit: Option<&mut TokenExit<'_>>, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache();
    let mut nll = 0.0;
    for pair in ids.windows(2) {
        let logits = match exit.as_deref_mut() {
            Some(exit) => exit.step(&pair[..1], &mut cache)?,
            None => model.forward_last(&pair[..1], &mut cache, None)?,
        };
        let log_probs = candle_nn::ops::log_softmax(&logits, 0)?;
        nll -= f64::from(log_probs.get(pair[1] as usize)?.to_scalar::<f32>()?);
    }
    Ok((nll / ids.len().saturating_sub(1).max(1) as f64).exp())
}

/// The per-token trade-off curves: for each measure and skipped-layer mode (a policy without
/// its threshold, e.g. `classifier` or `classifier:propagate`), its rows' (layers saved %,
/// agreement %) points in order of layers saved, each starting at full depth (0, 100).
pub fn tradeoff(rows: &[TokenExitRow]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for row in rows.iter().filter(|r| r.policy != "full") {
        let parts: Vec<&str> = row.policy.split(':').collect();
        let measure = match parts.as_slice() {
            [measure, _, mode] => format!("{measure}:{mode}"),
            _ => parts[0].to_string(),
        };
        let measure = measure.as_str();
        let point = (row.layers_saved_pct, 100.0 * row.agreement);
        match series.iter_mut().find(|(name, _)| name == measure) {
            Some((_, points)) => points.push(point),
            None => series.push((measure.to_string(), vec![(0.0, 100.0), point])),
        }
    }
    for (_, points) in &mut series {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    series
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(policy: &str, saved: f64, agreement: f64) -> TokenExitRow {
        TokenExitRow {
            policy: policy.into(),
            agreement,
            identical_outputs: 0,
            mean_exit_layer: 0.0,
            layers_saved_pct: saved,
            decode_tokens_per_s: 0.0,
            speedup: 1.0,
            perplexity: 1.0,
            perplexity_delta_pct: 0.0,
        }
    }

    #[test]
    fn the_curves_group_policies_by_measure_from_full_depth() {
        let rows = [
            row("full", 0.0, 1.0),
            row("classifier:0.6", 40.0, 0.7),
            row("confidence:0.9", 5.0, 0.95),
            row("classifier:0.9", 10.0, 0.9),
            row("classifier:0.9:propagate", 12.0, 0.8),
        ];
        let series = tradeoff(&rows);
        assert_eq!(series.len(), 3);
        assert_eq!(series[2].0, "classifier:propagate");
        assert_eq!(series[2].1, vec![(0.0, 100.0), (12.0, 80.0)]);
        assert_eq!(series[0].0, "classifier");
        assert_eq!(series[0].1, vec![(0.0, 100.0), (10.0, 90.0), (40.0, 70.0)]);
        assert_eq!(series[1].1, vec![(0.0, 100.0), (5.0, 95.0)]);
    }
}
