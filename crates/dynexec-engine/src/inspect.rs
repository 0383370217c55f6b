//! Which positions dynamic execution treated differently, for `analyze` to compare: where a
//! target rejected its draft ([`speculative_verdicts`]), and at which layer each token left
//! under per-token early exit ([`token_exit_layers`]); and the hidden-state windows leading up
//! to chosen positions ([`position_windows`]), one trial per position, for
//! [`dynexec_dsa::groups::compare_groups`].

use crate::{decode, Strategy};
use candle_core::Tensor;
use dynexec_core::sampling::SamplingParams;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::{Error, Result};
use dynexec_dsa::Trajectories;
use dynexec_exit::token_exit::{ExitAdapters, TokenExitPolicy};
use dynexec_models::generation::GenerateOptions;
use dynexec_models::llama::Llama;
use dynexec_spec::drafter::Drafter;
use dynexec_spec::engine::{generate_speculative, TokenOrigin};
use dynexec_spec::lookahead::Lookahead;

/// Greedy decoding that runs `max_tokens` whatever the end-of-sequence token says, so every
/// prompt yields the same number of positions.
fn fixed_length(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams::default(),
        stop_at_eos: false,
    }
}

/// Decodes `max_tokens` greedy tokens after `prompt_ids` speculatively (lossless: the tokens
/// are `target`'s own) and returns every token (prompt first) and the engine's record of
/// each generated token's origin.
pub fn speculative_verdicts(
    target: &Llama,
    drafter: &mut dyn Drafter,
    lookahead: &mut dyn Lookahead,
    tokenizer: &TextTokenizer,
    prompt_ids: &[u32],
    max_tokens: usize,
) -> Result<(Vec<u32>, Vec<TokenOrigin>)> {
    let out = generate_speculative(
        target,
        drafter,
        lookahead,
        tokenizer,
        prompt_ids,
        &fixed_length(max_tokens),
        |_| Ok(()),
    )?;
    let mut tokens = prompt_ids.to_vec();
    tokens.extend_from_slice(&out.generation.token_ids);
    Ok((tokens, out.origins))
}

/// Decodes `max_tokens` greedy tokens after `prompt_ids` with per-token early exit and
/// returns every token (prompt first) and, per decoding step, the layer it exited after:
/// entry `i` belongs to position `prompt_ids.len() + i`, whose state chose generated token
/// `i + 1` (the first generated token comes from the full-depth prefill).
pub fn token_exit_layers(
    model: &Llama,
    tokenizer: &TextTokenizer,
    adapters: &ExitAdapters,
    policy: TokenExitPolicy,
    prompt_ids: &[u32],
    max_tokens: usize,
) -> Result<(Vec<u32>, Vec<usize>)> {
    let mut strategy = Strategy::EarlyExit { adapters, policy };
    let decoded = decode(
        model,
        tokenizer,
        prompt_ids,
        &fixed_length(max_tokens),
        &mut strategy,
        None,
        |_| Ok(()),
    )?;
    let mut tokens = prompt_ids.to_vec();
    tokens.extend_from_slice(&decoded.generation.token_ids);
    let layers = decoded
        .report
        .early_exit
        .map(|report| report.exit_layers)
        .unwrap_or_default();
    Ok((tokens, layers))
}

/// Per layer, one trial per entry of `ends`: the `window` states ending at that position
/// (`layers` are `(index, positions × features)`). A window must not reach position 0,
/// whose outlier activations (the attention sink) would dominate every metric.
pub fn position_windows(
    layers: &[(usize, Tensor)],
    ends: &[usize],
    window: usize,
) -> Result<Vec<(usize, Trajectories)>> {
    if window == 0 {
        return Err(Error::InvalidArgument(
            "the window must hold at least one position".into(),
        ));
    }
    layers
        .iter()
        .map(|(layer, states)| {
            let (positions, features) = states.dims2()?;
            let values: Vec<f32> = states.flatten_all()?.to_vec1()?;
            let mut data = Vec::with_capacity(ends.len() * window * features);
            for &end in ends {
                if end < window || end >= positions {
                    return Err(Error::InvalidArgument(format!(
                        "position {end} has no window of {window} positions after position 0 in a trace of {positions}"
                    )));
                }
                let start = (end + 1 - window) * features;
                data.extend(values[start..(end + 1) * features].iter().map(|&v| f64::from(v)));
            }
            let trials = Trajectories::from_3d(ends.len(), window, features, data)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            Ok((*layer, trials))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn windows_end_at_their_positions_and_avoid_the_first() {
        // 6 positions x 2 features: position p holds (p, 10p).
        let states = Tensor::from_vec(
            (0..6)
                .flat_map(|p| [p as f32, 10.0 * p as f32])
                .collect::<Vec<_>>(),
            (6, 2),
            &Device::Cpu,
        )
        .unwrap();
        let windows = position_windows(&[(3, states.clone())], &[3, 5], 2).unwrap();
        let (layer, trials) = &windows[0];
        assert_eq!(*layer, 3);
        assert_eq!(
            (trials.trials(), trials.time(), trials.features()),
            (2, 2, 2)
        );
        assert_eq!(trials.at(0, 0), &[2.0, 20.0]);
        assert_eq!(trials.at(1, 1), &[5.0, 50.0]);
        let err = position_windows(&[(3, states.clone())], &[1], 2).unwrap_err();
        assert!(err.to_string().contains("no window"), "{err}");
        assert!(position_windows(&[(3, states)], &[6], 1).is_err());
    }
}
