//! What to draft with, as a user names it (`--draft`, the server's draft), and how to build
//! it for a target: the one place a new drafter is registered.

use crate::drafter::{check_vocab, ChainDrafter, Drafter, ModelDrafter, NgramDrafter};
use crate::token_ranking::DraftVocab;
use candle_core::Device;
use dynexec_core::files::Resolve;
use dynexec_core::{Error, Result, Setting};
use dynexec_exit::token_exit::ExitAdapters;
use dynexec_models::linear::WeightFormat;
use dynexec_models::llama::LoadedDecoder;
use dynexec_models::loading::{load, LoadOptions};
use dynexec_models::quantize::{quantize_in_place, QuantTarget};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A draft, parsed from `MODEL | self-quant[:TYPE] | self-layers:E | ngram[:N,K]`, or two
/// of them joined by `+` (the first's proposal when it has one, the second's otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DraftSpec {
    /// A separate model with the target's tokenizer: a manifest name, `hf:` reference or path.
    Model(String),
    /// The target's own copy with its linear layers converted to this format.
    SelfQuant(WeightFormat),
    /// The target's first E layers and its head (layer-skip self-drafting).
    SelfLayers(usize),
    /// Prompt lookup: the continuation of the latest earlier match of the last n-gram.
    Ngram {
        /// Longest n-gram matched.
        max_ngram: usize,
        /// Most tokens proposed at once.
        max_tokens: usize,
    },
    /// The first draft's proposal when it has one, the second's otherwise (e.g. prompt
    /// lookup, then a draft model).
    Chain(Box<DraftSpec>, Box<DraftSpec>),
}

/// What building a draft may need besides the target.
pub struct DraftSources<'a> {
    /// Resolves a draft model's reference.
    pub hub: &'a dyn Resolve,
    /// The device a draft model is loaded on (the target's).
    pub device: &'a Device,
    /// How a draft model is loaded (the target's conversion and kernels).
    pub load_options: LoadOptions,
    /// Convert a draft model to this format instead (a cheaper draft; output is unchanged).
    pub draft_quant: Option<WeightFormat>,
    /// Exit adapters: a `self-layers:E` draft's hidden state goes through layer E's adapter
    /// before the head. Only that draft takes them.
    pub exit_adapters: Option<&'a ExitAdapters>,
    /// FR-Spec: draft models propose only this ranking's most frequent tokens.
    pub draft_vocab: Option<&'a DraftVocab>,
}

fn bad(spec: &str, help: impl Into<String>) -> Error {
    Error::BadSpec {
        setting: Setting::Draft,
        spec: spec.to_string(),
        help: help.into(),
    }
}

impl FromStr for DraftSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        if let Some((first, then)) = spec.split_once('+') {
            if first.is_empty() || then.is_empty() {
                return Err(bad(spec, "a chain is FIRST+THEN, e.g. ngram+MODEL"));
            }
            return Ok(Self::Chain(
                Box::new(first.parse()?),
                Box::new(then.parse()?),
            ));
        }
        let (kind, arg) = spec
            .split_once(':')
            .map_or((spec, None), |(k, a)| (k, Some(a)));
        match kind {
            "self-quant" => Ok(Self::SelfQuant(arg.unwrap_or("q8_0").parse()?)),
            "self-layers" => match arg.map(str::parse::<usize>) {
                Some(Ok(depth)) if depth >= 1 => Ok(Self::SelfLayers(depth)),
                _ => Err(bad(spec, "self-layers:E needs a layer count E >= 1")),
            },
            "ngram" => {
                let Some(arg) = arg else {
                    return Ok(Self::Ngram {
                        max_ngram: 3,
                        max_tokens: 10,
                    });
                };
                let parsed: Option<(usize, usize)> = arg
                    .split_once(',')
                    .and_then(|(n, k)| Some((n.parse().ok()?, k.parse().ok()?)));
                match parsed {
                    Some((n, k)) if n > 0 && k > 0 => Ok(Self::Ngram {
                        max_ngram: n,
                        max_tokens: k,
                    }),
                    _ => Err(bad(spec, "ngram:N,K needs two positive integers (max n-gram, max continuation), e.g. ngram:3,10")),
                }
            }
            _ => Ok(Self::Model(spec.to_string())),
        }
    }
}

impl fmt::Display for DraftSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Model(reference) => f.write_str(reference),
            Self::SelfQuant(format) => write!(f, "self-quant:{format}"),
            Self::SelfLayers(depth) => write!(f, "self-layers:{depth}"),
            Self::Ngram {
                max_ngram,
                max_tokens,
            } => write!(f, "ngram:{max_ngram},{max_tokens}"),
            Self::Chain(first, then) => write!(f, "{first}+{then}"),
        }
    }
}

impl DraftSpec {
    /// Whether this draft runs a model (anything but prompt lookup, alone or in a chain).
    pub fn uses_a_model(&self) -> bool {
        match self {
            Self::Ngram { .. } => false,
            Self::Chain(first, then) => first.uses_a_model() || then.uses_a_model(),
            _ => true,
        }
    }

    /// Whether exit adapters serve this draft (a `self-layers:E` draft, alone or in a chain).
    pub fn uses_exit_adapters(&self) -> bool {
        match self {
            Self::SelfLayers(_) => true,
            Self::Chain(first, then) => first.uses_exit_adapters() || then.uses_exit_adapters(),
            _ => false,
        }
    }

    /// Builds the drafter for `target`. A draft model must spell every id as the target
    /// does; `self-layers:E` needs E below the target's depth (and, with exit adapters, an
    /// adapter after layer E).
    pub fn build(
        &self,
        target: &LoadedDecoder,
        sources: &DraftSources<'_>,
    ) -> Result<Box<dyn Drafter>> {
        if sources.exit_adapters.is_some() && !self.uses_exit_adapters() {
            return Err(Error::setting(
                Setting::ExitAdapters,
                format!("serves early exit or a self-layers:E draft, not `{self}`"),
            ));
        }
        if sources.draft_vocab.is_some() && !self.uses_a_model() {
            return Err(Error::setting(
                Setting::DraftVocab,
                format!("limits a draft model's proposals; `{self}` runs no model"),
            ));
        }
        // A draft model proposes from the ranking's top tokens (ids mean the same tokens in
        // the target's tokenizer, which every model draft shares).
        let narrowed = |drafter: ModelDrafter| -> Result<Box<dyn Drafter>> {
            Ok(match sources.draft_vocab {
                Some(vocab) => Box::new(
                    drafter
                        .with_vocab_subset(&vocab.ranking.subset(vocab.size, &target.tokenizer)?)?,
                ),
                None => Box::new(drafter),
            })
        };
        match self {
            Self::SelfQuant(format) => {
                let mut copy = target.model.clone();
                quantize_in_place(&mut copy, *format)
                    .map_err(|e| e.context(format!("quantizing the target's copy to {format}")))?;
                narrowed(ModelDrafter::new(copy, self.to_string()))
            }
            &Self::SelfLayers(depth) => {
                let layers = target.model.num_layers();
                if depth >= layers {
                    return Err(bad(
                        &self.to_string(),
                        format!("self-layers:E needs 1 <= E < {layers} (the target's layer count)"),
                    ));
                }
                let Some(adapters) = sources.exit_adapters else {
                    let drafter =
                        ModelDrafter::with_depth(target.model.clone(), depth, self.to_string());
                    return narrowed(drafter);
                };
                let index = adapters.exit_index(depth).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "the exit adapters have exits after layers {:?}: draft with one of those depths",
                        adapters.card.layers
                    ))
                })?;
                let adapters = adapters.clone();
                narrowed(
                    ModelDrafter::with_depth(
                        target.model.clone(),
                        depth,
                        format!("self-layers:{depth}+adapter"),
                    )
                    .with_exit_adapter(Arc::new(move |h| adapters.adapt(index, h))),
                )
            }
            &Self::Ngram {
                max_ngram,
                max_tokens,
            } => Ok(Box::new(NgramDrafter::new(max_ngram, max_tokens))),
            Self::Chain(first, then) => {
                // Exit adapters go to the self-layers part of a chain.
                let part = |spec: &DraftSpec| DraftSources {
                    hub: sources.hub,
                    device: sources.device,
                    load_options: sources.load_options.clone(),
                    draft_quant: sources.draft_quant,
                    exit_adapters: sources.exit_adapters.filter(|_| spec.uses_exit_adapters()),
                    draft_vocab: sources.draft_vocab.filter(|_| spec.uses_a_model()),
                };
                Ok(Box::new(ChainDrafter::new(
                    first.build(target, &part(first))?,
                    then.build(target, &part(then))?,
                )))
            }
            Self::Model(reference) => {
                let mut options = sources.load_options.clone();
                if let Some(format) = sources.draft_quant {
                    options.quant = Some(QuantTarget::To(format));
                }
                let draft = load(sources.hub, reference, sources.device, &options)
                    .map_err(|e| e.context(format!("loading draft model `{reference}`")))?
                    .decoder;
                check_vocab(&target.model, &draft.model)?;
                check_same_tokens(target, &draft)?;
                // A converted draft drafts differently: its name says so (DISCO cards match it).
                let name = match sources.draft_quant {
                    Some(format) => format!("{reference}@{format}"),
                    None => reference.clone(),
                };
                narrowed(ModelDrafter::new(draft.model, name))
            }
        }
    }
}

/// Ids must spell the same tokens in both tokenizers, or accepted drafts would be other words.
pub fn check_same_tokens(target: &LoadedDecoder, draft: &LoadedDecoder) -> Result<()> {
    let size = target.tokenizer.vocab_size();
    for id in (0..size as u32).step_by((size / 64).max(1)) {
        let (t, d) = (
            target.tokenizer.id_to_token(id),
            draft.tokenizer.id_to_token(id),
        );
        if t != d {
            return Err(Error::InvalidArgument(format!("the draft's tokenizer differs from the target's: id {id} is {d:?} there and {t:?} in the target; use a draft from the same model family")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_every_kind() {
        for (text, spec) in [
            ("self-quant", DraftSpec::SelfQuant(WeightFormat::Q8_0)),
            ("self-quant:q4_0", DraftSpec::SelfQuant(WeightFormat::Q4_0)),
            ("self-layers:8", DraftSpec::SelfLayers(8)),
            (
                "ngram",
                DraftSpec::Ngram {
                    max_ngram: 3,
                    max_tokens: 10,
                },
            ),
            (
                "ngram:2,5",
                DraftSpec::Ngram {
                    max_ngram: 2,
                    max_tokens: 5,
                },
            ),
            (
                "qwen2.5-coder-0.5b-instruct",
                DraftSpec::Model("qwen2.5-coder-0.5b-instruct".into()),
            ),
        ] {
            let parsed: DraftSpec = text.parse().unwrap();
            assert_eq!(parsed, spec, "{text}");
            let shown = parsed.to_string();
            assert_eq!(shown.parse::<DraftSpec>().unwrap(), spec, "{shown}");
        }
    }

    #[test]
    fn bad_specs_name_the_setting_and_the_fix() {
        for text in [
            "ngram:0,3",
            "ngram:3",
            "self-layers",
            "self-layers:0",
            "self-layers:x",
        ] {
            match text.parse::<DraftSpec>() {
                Err(Error::BadSpec {
                    setting: Setting::Draft,
                    spec,
                    help,
                }) => {
                    assert_eq!(spec, text);
                    assert!(help.contains("needs"), "{help}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!("self-quant:q9_9".parse::<DraftSpec>().is_err());
    }
}
