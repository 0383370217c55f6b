//! BERT-family encoder (all-MiniLM-L6-v2 and friends) with addressable layers.
//!
//! `embed` → `forward_layers(a..b)` → pooling are separate calls, so early-exit heads can
//! read the hidden state after any layer. Padding is handled with an additive attention mask.

use crate::linear::{HasLinears, Linear};
use crate::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use dynexec_core::files::ModelFiles;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::Error;
use serde::Deserialize;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The subset of a transformers BERT `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Token ids in the vocabulary.
    pub vocab_size: usize,
    /// Width of the hidden state; a multiple of `num_attention_heads`.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Feed-forward activation: `gelu` (erf), `gelu_new` or `gelu_pytorch_tanh` (tanh
    /// approximation), or `relu`; `gelu` when absent.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Longest input, in tokens (rows of the position embedding).
    pub max_position_embeddings: usize,
    /// Rows of the token-type embedding; 2 when absent.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon; 1e-12 when absent.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// transformers' `model_type`, e.g. `bert`; read but not checked.
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_act() -> String {
    "gelu".to_string()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Reads a `config.json`, refusing unsupported activations and a hidden size that the
    /// heads do not divide ([`Error::InvalidModel`]).
    pub fn from_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let invalid = |message: String| Error::InvalidModel {
            path: path.to_path_buf(),
            message,
        };
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("not a BERT config.json: {e}")))?;
        if !matches!(
            cfg.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "relu"
        ) {
            return Err(invalid(format!(
                "hidden_act `{}` is not supported (gelu, gelu_new, relu are)",
                cfg.hidden_act
            )));
        }
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(invalid(
                "hidden_size must be a multiple of num_attention_heads".to_string(),
            ));
        }
        Ok(cfg)
    }
}

#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let x = x.contiguous()?;
        // candle's fused layer norm has no backward pass; training takes dynexec's fused one
        // (f32 on the CPU) or the composed one.
        Ok(if differentiable && crate::fused::fusable(&x) {
            crate::fused::layer_norm(&x, &self.weight, &self.bias, self.eps)?
        } else if differentiable {
            candle_nn::ops::layer_norm_slow(&x, &self.weight, &self.bias, self.eps)?
        } else {
            candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps)?
        })
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// Where an encoder's config, weights and tokenizer are among a model's files.
#[derive(Debug, Clone)]
pub struct EncoderFiles {
    /// The transformers `config.json`.
    pub config: PathBuf,
    /// The safetensors weight files.
    pub weights: Vec<PathBuf>,
    /// The `tokenizer.json`.
    pub tokenizer: PathBuf,
}

impl EncoderFiles {
    /// Whether `files` hold an encoder: a transformers folder whose config.json says `bert`.
    pub fn is_encoder(files: &ModelFiles) -> bool {
        files
            .find("config.json")
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|c| c["model_type"] == "bert")
    }

    /// Finds `config.json`, the safetensors weights and `tokenizer.json` (or uses `tokenizer`)
    /// in a transformers folder.
    pub fn find(files: &ModelFiles, tokenizer: Option<&Path>) -> Result<Self> {
        let missing =
            |what: &str| Error::InvalidArgument(format!("`{}` has no {what}", files.name));
        let config = files
            .find("config.json")
            .ok_or_else(|| missing("config.json: it is not a transformers encoder"))?;
        let tokenizer = match tokenizer {
            Some(path) => path.to_path_buf(),
            None => files
                .find("tokenizer.json")
                .ok_or_else(|| Error::NeedsTokenizer {
                    reason: format!("`{}` has no tokenizer.json", files.name),
                })?
                .to_path_buf(),
        };
        Ok(Self {
            config: config.to_path_buf(),
            weights: files
                .find_all(".safetensors")
                .into_iter()
                .map(Path::to_path_buf)
                .collect(),
            tokenizer,
        })
    }

    /// The encoder in F32 and its tokenizer.
    pub fn load(&self, device: &Device) -> Result<(Bert, TextTokenizer)> {
        Ok((
            Bert::load(&self.config, &self.weights, DType::F32, device)?,
            TextTokenizer::from_file(&self.tokenizer)?,
        ))
    }
}

/// A loaded BERT encoder.
#[derive(Debug, Clone)]
pub struct Bert {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    config: BertConfig,
    device: Device,
    /// Built from trainable variables: use ops that have a backward pass.
    differentiable: bool,
}

fn linear(vb: VarBuilder, out: usize, inp: usize) -> Result<Linear> {
    Linear::dense(vb.get((out, inp), "weight")?, Some(vb.get(out, "bias")?))
}

impl Bert {
    /// Reads `config.json` and safetensors weights (with or without a `bert.` prefix).
    pub fn load(
        config_path: &Path,
        weights: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let config = BertConfig::from_json(config_path)?;
        let vb = crate::safetensors::open(weights, dtype, device)?;
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        Self::from_var_builder(config, vb, device)
            .map_err(|e| crate::safetensors::corrupt(weights, e))
    }

    /// Loads F32 weights as trainable variables (for joint fine-tuning): the returned `VarMap`
    /// holds every weight under its name in the file, and the model's forward pass is
    /// differentiable.
    pub fn load_trainable(
        config_path: &Path,
        weights: &[PathBuf],
        device: &Device,
    ) -> Result<(Self, candle_nn::VarMap)> {
        let config = BertConfig::from_json(config_path)?;
        let varmap = candle_nn::VarMap::new();
        let mut prefixed = false;
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Error::InvalidArgument("variable map poisoned".into()))?;
            for path in weights {
                if !path.exists() {
                    return Err(Error::MissingFile(path.clone()));
                }
                let tensors = candle_core::safetensors::load(path, device)
                    .map_err(|e| crate::safetensors::corrupt(weights, e.into()))?;
                for (name, tensor) in tensors {
                    prefixed |= name.starts_with("bert.");
                    let var = candle_core::Var::from_tensor(&tensor.to_dtype(DType::F32)?)?;
                    data.insert(name, var);
                }
            }
        }
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, device);
        let vb = if prefixed { vb.pp("bert") } else { vb };
        let mut model = Self::from_var_builder(config, vb, device)
            .map_err(|e| crate::safetensors::corrupt(weights, e))?;
        model.differentiable = true;
        Ok((model, varmap))
    }

    fn from_var_builder(config: BertConfig, vb: VarBuilder, device: &Device) -> Result<Self> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let evb = vb.pp("embeddings");
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for n in 0..config.num_hidden_layers {
            let lvb = vb.pp(format!("encoder.layer.{n}"));
            let avb = lvb.pp("attention");
            layers.push(EncoderLayer {
                query: linear(avb.pp("self.query"), h, h)?,
                key: linear(avb.pp("self.key"), h, h)?,
                value: linear(avb.pp("self.value"), h, h)?,
                attention_output: linear(avb.pp("output.dense"), h, h)?,
                attention_norm: LayerNorm::load(
                    avb.pp("output.LayerNorm"),
                    h,
                    config.layer_norm_eps,
                )?,
                intermediate: linear(lvb.pp("intermediate.dense"), i, h)?,
                output: linear(lvb.pp("output.dense"), h, i)?,
                output_norm: LayerNorm::load(lvb.pp("output.LayerNorm"), h, config.layer_norm_eps)?,
            });
        }
        Ok(Self {
            word_embeddings: evb
                .pp("word_embeddings")
                .get((config.vocab_size, h), "weight")?,
            position_embeddings: evb
                .pp("position_embeddings")
                .get((config.max_position_embeddings, h), "weight")?,
            token_type_embeddings: evb
                .pp("token_type_embeddings")
                .get((config.type_vocab_size, h), "weight")?,
            embeddings_norm: LayerNorm::load(evb.pp("LayerNorm"), h, config.layer_norm_eps)?,
            layers,
            config,
            device: device.clone(),
            differentiable: false,
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Encoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The device its weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of every weight as stored.
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let n = |n: &LayerNorm| t(&n.weight) + t(&n.bias);
        let bias = |l: &Linear| l.bias().map(t).unwrap_or(0);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.query,
                    &l.key,
                    &l.value,
                    &l.attention_output,
                    &l.intermediate,
                    &l.output,
                ]
                .iter()
                .map(|x| x.weight_bytes() + bias(x))
                .sum::<usize>()
                    + n(&l.attention_norm)
                    + n(&l.output_norm)
            })
            .sum();
        layers
            + t(&self.word_embeddings)
            + t(&self.position_embeddings)
            + t(&self.token_type_embeddings)
            + n(&self.embeddings_norm)
    }

    /// Token ids `(batch, seq)` (token types all 0) → embeddings `(batch, seq, hidden)`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            return Err(Error::ContextOverflow {
                prompt_tokens: seq,
                requested: 0,
                context: self.config.max_position_embeddings,
            });
        }
        let h = self.config.hidden_size;
        let words = self
            .word_embeddings
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((batch, seq, h))?;
        let positions = self.position_embeddings.narrow(0, 0, seq)?.unsqueeze(0)?;
        let types = self.token_type_embeddings.narrow(0, 0, 1)?.unsqueeze(0)?;
        let x = words.broadcast_add(&positions)?.broadcast_add(&types)?;
        self.embeddings_norm.forward(&x, self.differentiable)
    }

    /// `(batch, seq)` mask of 1 (token) / 0 (padding) → additive `(batch, 1, 1, seq)` mask.
    pub fn attention_bias(&self, mask: &Tensor) -> Result<Tensor> {
        let (batch, seq) = mask.dims2()?;
        let mask = mask.to_dtype(DType::F32)?;
        // 0 where attended, a large negative number where padded.
        let bias = ((mask - 1.0)? * 1e9)?;
        Ok(bias
            .reshape((batch, 1, 1, seq))?
            .to_dtype(self.word_embeddings.dtype())?)
    }

    /// Runs layers `layers` on `hidden` with the additive attention bias of [`Self::attention_bias`].
    pub fn forward_layers(
        &self,
        hidden: &Tensor,
        attention_bias: &Tensor,
        layers: Range<usize>,
    ) -> Result<Tensor> {
        if layers.end > self.layers.len() || layers.start > layers.end {
            return Err(Error::InvalidArgument(format!(
                "layer range {}..{} is outside the encoder's {} layers",
                layers.start,
                layers.end,
                self.layers.len()
            )));
        }
        let mut x = hidden.clone();
        for l in layers {
            x = self.layer_forward(&self.layers[l], &x, attention_bias)?;
        }
        Ok(x)
    }

    fn layer_forward(
        &self,
        layer: &EncoderLayer,
        x: &Tensor,
        attention_bias: &Tensor,
    ) -> Result<Tensor> {
        let (batch, seq, hidden) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let head_dim = hidden / heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(layer.query.forward(x)?)?;
        let k = split(layer.key.forward(x)?)?;
        let v = split(layer.value.forward(x)?)?;
        let scores =
            (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?.broadcast_add(attention_bias)?;
        let probs = if self.differentiable && crate::fused::fusable(&scores) {
            crate::fused::softmax_last_dim(&scores.contiguous()?)?
        } else if self.differentiable {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq, hidden))?;
        let attended = layer.attention_norm.forward(
            &(layer.attention_output.forward(&context)? + x)?,
            self.differentiable,
        )?;
        let inner = layer.intermediate.forward(&attended)?;
        let inner = match self.config.hidden_act.as_str() {
            "gelu" if self.differentiable && crate::fused::fusable(&inner) => {
                crate::fused::gelu_erf(&inner.contiguous()?)?
            }
            "gelu" => inner.gelu_erf()?,
            "relu" => inner.relu()?,
            _ => inner.gelu()?,
        };
        layer.output_norm.forward(
            &(layer.output.forward(&inner)? + attended)?,
            self.differentiable,
        )
    }

    /// Every layer: ids and mask `(batch, seq)` → last hidden state `(batch, seq, hidden)`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let hidden = self.embed(ids)?;
        self.forward_layers(&hidden, &self.attention_bias(mask)?, 0..self.layers.len())
    }
}

/// Mean of the hidden states over real (unpadded) tokens, `(batch, hidden)`.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    Ok(summed.broadcast_div(&counts)?)
}

/// Rows scaled to unit L2 norm.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
}

impl HasLinears for Bert {
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 6);
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (name, linear) in [
                ("attn_q", &mut l.query),
                ("attn_k", &mut l.key),
                ("attn_v", &mut l.value),
                ("attn_output", &mut l.attention_output),
                ("ffn_up", &mut l.intermediate),
                ("ffn_down", &mut l.output),
            ] {
                out.push((format!("blk.{i}.{name}"), linear));
            }
        }
        out
    }
}

/// Token ids of several sequences as one `(batch, longest)` batch, padded with id 0, and its
/// attention mask (1 on real tokens, 0 on padding).
pub fn pad_batch(encoded: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
    let longest = encoded.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(encoded.len() * longest);
    let mut mask = Vec::with_capacity(encoded.len() * longest);
    for e in encoded {
        ids.extend(
            e.iter()
                .copied()
                .chain(std::iter::repeat(0).take(longest - e.len())),
        );
        mask.extend((0..longest).map(|i| u32::from(i < e.len())));
    }
    Ok((
        Tensor::from_vec(ids, (encoded.len(), longest), device)?,
        Tensor::from_vec(mask, (encoded.len(), longest), device)?,
    ))
}

impl Bert {
    /// Sentence embeddings (mean pooling + L2 norm, as sentence-transformers computes them),
    /// `(sentences, hidden)`, in batches padded to their longest sentence.
    pub fn sentence_embeddings(
        &self,
        tokenizer: &TextTokenizer,
        sentences: &[&str],
        batch_size: usize,
    ) -> Result<Tensor> {
        let mut out = Vec::new();
        for batch in sentences.chunks(batch_size.max(1)) {
            let encoded = batch
                .iter()
                .map(|s| tokenizer.encode(s))
                .collect::<Result<Vec<_>>>()?;
            let (ids, mask) = pad_batch(&encoded, &self.device)?;
            let hidden = self.forward(&ids, &mask)?;
            out.push(l2_normalize(&mean_pool(&hidden, &mask)?)?);
        }
        if out.is_empty() {
            return Err(Error::InvalidArgument("no sentences to embed".to_string()));
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}
