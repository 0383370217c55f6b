//! Building drafters and lookahead controllers from `--draft` and `--lookahead`.

use super::generate::load_model;
use crate::options::GlobalOptions;
use anyhow::{bail, Context, Result};
use dynexec_exit::token_exit::ExitAdapters;
use dynexec_models::llama::LoadedDecoder;
use dynexec_quant::{quantize_in_place, WeightFormat};
use dynexec_spec::drafter::{check_vocab, Drafter, ModelDrafter, NgramDrafter};

/// Parses `MODEL | self-quant[:TYPE] | self-layers:E | ngram[:N,K]` into a drafter for
/// `target`.
/// `exit_adapters`, when given, map a `self-layers:E` draft's hidden state into the head
/// through the adapter trained for layer E.
pub fn build_drafter(
    global: &GlobalOptions,
    spec: &str,
    target: &LoadedDecoder,
    exit_adapters: Option<&ExitAdapters>,
) -> Result<Box<dyn Drafter>> {
    if exit_adapters.is_some() && !spec.starts_with("self-layers") {
        bail!("--exit-adapters serves --early-exit or a self-layers:E draft, not `{spec}`");
    }
    let (kind, arg) = spec
        .split_once(':')
        .map_or((spec, None), |(k, a)| (k, Some(a)));
    match kind {
        "self-quant" => {
            let format: WeightFormat = arg.unwrap_or("q8_0").parse()?;
            let mut copy = target.model.clone();
            quantize_in_place(&mut copy, format)
                .with_context(|| format!("quantizing the target's copy to {format}"))?;
            Ok(Box::new(ModelDrafter::new(
                copy,
                format!("self-quant:{format}"),
            )))
        }
        "self-layers" => {
            let layers = target.model.num_layers();
            let depth: usize = match arg.map(str::parse) {
                Some(Ok(e)) if e >= 1 && e < layers => e,
                _ => bail!(
                    "--draft self-layers:E needs 1 <= E < {layers} (the target's layer count)"
                ),
            };
            let Some(adapters) = exit_adapters else {
                return Ok(Box::new(ModelDrafter::with_depth(
                    target.model.clone(),
                    depth,
                    format!("self-layers:{depth}"),
                )));
            };
            let index = adapters.exit_index(depth).with_context(|| {
                format!(
                    "the exit adapters have exits after layers {:?}: draft with one of those depths",
                    adapters.card.layers
                )
            })?;
            let adapters = adapters.clone();
            Ok(Box::new(
                ModelDrafter::with_depth(
                    target.model.clone(),
                    depth,
                    format!("self-layers:{depth}+adapter"),
                )
                .with_exit_adapter(std::sync::Arc::new(move |h| adapters.adapt(index, h))),
            ))
        }
        "ngram" => {
            let (n, k) = match arg {
                None => (3, 10),
                Some(a) => {
                    let parsed: Option<(usize, usize)> = a
                        .split_once(',')
                        .and_then(|(n, k)| Some((n.parse().ok()?, k.parse().ok()?)));
                    match parsed {
                        Some((n, k)) if n > 0 && k > 0 => (n, k),
                        _ => bail!("--draft ngram:N,K needs two positive integers (max n-gram, max continuation), e.g. ngram:3,10"),
                    }
                }
            };
            Ok(Box::new(NgramDrafter::new(n, k)))
        }
        _ => {
            // Any other value is a model: a manifest name, hf: reference or path.
            let draft = load_model(global, spec, None, global.quant)
                .with_context(|| format!("loading draft model `{spec}`"))?;
            check_vocab(&target.model, &draft.model)?;
            check_same_tokens(target, &draft)?;
            Ok(Box::new(ModelDrafter::new(draft.model, spec.to_string())))
        }
    }
}

/// Ids must spell the same tokens in both tokenizers, or accepted drafts would be other words.
fn check_same_tokens(target: &LoadedDecoder, draft: &LoadedDecoder) -> Result<()> {
    let size = target.tokenizer.vocab_size();
    for id in (0..size as u32).step_by((size / 64).max(1)) {
        let (t, d) = (
            target.tokenizer.id_to_token(id),
            draft.tokenizer.id_to_token(id),
        );
        if t != d {
            bail!("the draft's tokenizer differs from the target's: id {id} is {d:?} there and {t:?} in the target; use a draft from the same model family");
        }
    }
    Ok(())
}
