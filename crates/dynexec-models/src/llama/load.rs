//! Building a [`Llama`] from a GGUF file or from safetensors + `config.json`.

use super::{Attention, DecoderLayer, Llama, LlamaConfig, Mlp, RmsNorm, Rope, TokenEmbedding};
use crate::linear::Linear;
use crate::Result;
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use dynexec_core::files::ModelFiles;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::Error;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A decoder and the tokenizer that goes with it.
pub struct LoadedDecoder {
    /// The decoder.
    pub model: Llama,
    /// Its tokenizer: from `tokenizer.json`, or built from the GGUF's metadata.
    pub tokenizer: TextTokenizer,
    /// `gguf` or `safetensors`.
    pub format: &'static str,
}

/// Loads the decoder in `files`: a GGUF (its tokenizer from the metadata unless
/// `tokenizer` is given) or safetensors with `config.json` and `tokenizer.json`.
pub fn load_decoder(
    files: &ModelFiles,
    tokenizer: Option<&Path>,
    dtype: Option<DType>,
    device: &Device,
) -> Result<LoadedDecoder> {
    if let Some(gguf) = files.find(".gguf") {
        // The tokenizer first, then the weights: its metadata (152k tokens and merges for
        // Qwen2.5) and the build's temporaries are freed before the weights arrive, so they
        // do not add to the peak (Qwen2.5-0.5B: 1.18x -> 1.09x its file).
        let (file, mut content) = read_gguf(gguf)?;
        let tokenizer = match tokenizer {
            Some(path) => {
                let tokenizer = TextTokenizer::from_file(path)?;
                check_against_gguf_vocab(&tokenizer, &content, path)?;
                tokenizer
            }
            None => TextTokenizer::from_gguf(&content).map_err(|e| match e {
                Error::NeedsTokenizer { reason } => Error::NeedsTokenizer {
                    reason: format!("{}: {reason}", gguf.display()),
                },
                e => Error::InvalidModel {
                    path: gguf.to_path_buf(),
                    message: e.to_string(),
                },
            })?,
        };
        for key in TOKENIZER_ARRAYS {
            content.metadata.remove(key);
        }
        let model = Llama::from_gguf(gguf, file, &content, device)?;
        check_vocab(&model, &tokenizer)?;
        return Ok(LoadedDecoder {
            model,
            tokenizer,
            format: "gguf",
        });
    }
    let config = files
        .find("config.json")
        .filter(|p| p.file_name().is_some_and(|n| n == "config.json"));
    let weights: Vec<PathBuf> = files
        .find_all(".safetensors")
        .into_iter()
        .map(Path::to_path_buf)
        .collect();
    let (Some(config), false) = (config, weights.is_empty()) else {
        return Err(Error::InvalidArgument(format!(
            "`{}` has no .gguf file and no config.json + .safetensors weights: point to a GGUF file or a transformers model folder",
            files.name
        )));
    };
    let dtype = dtype.unwrap_or(if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    });
    let model = Llama::load_safetensors(config, &weights, dtype, device)?;
    let tokenizer_path = match tokenizer {
        Some(path) => path.to_path_buf(),
        None => files
            .find("tokenizer.json")
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::NeedsTokenizer {
                reason: format!("`{}` has no tokenizer.json", files.name),
            })?,
    };
    let tokenizer = TextTokenizer::from_file(&tokenizer_path)?;
    check_vocab(&model, &tokenizer)?;
    Ok(LoadedDecoder {
        model,
        tokenizer,
        format: "safetensors",
    })
}

/// A tokenizer with more ids than the model has embeddings belongs to another model.
fn check_vocab(model: &Llama, tokenizer: &TextTokenizer) -> Result<()> {
    let (tok, emb) = (tokenizer.vocab_size(), model.config.vocab_size);
    if tok > emb {
        return Err(Error::InvalidArgument(format!(
            "the tokenizer has {tok} tokens but the model's vocabulary has {emb}: they belong to different models; pass the model's own tokenizer"
        )));
    }
    Ok(())
}

/// A tokenizer given with `--tokenizer` must spell tokens as the GGUF's own vocabulary does;
/// sampled ids across the vocabulary are compared.
fn check_against_gguf_vocab(
    tokenizer: &TextTokenizer,
    content: &gguf_file::Content,
    path: &Path,
) -> Result<()> {
    let Some(Ok(tokens)) = content
        .metadata
        .get("tokenizer.ggml.tokens")
        .map(|v| v.to_vec())
    else {
        return Ok(());
    };
    let step = (tokens.len() / 64).max(1);
    for id in (0..tokens.len()).step_by(step) {
        let expected = tokens[id].to_string().ok();
        let actual = tokenizer.id_to_token(id as u32);
        if expected != actual.as_ref() {
            return Err(Error::InvalidArgument(format!(
                "tokenizer {} does not match the model's vocabulary: id {id} is {:?} there but {:?} in the model; use the model's own tokenizer",
                path.display(),
                actual.unwrap_or_default(),
                expected.cloned().unwrap_or_default()
            )));
        }
    }
    Ok(())
}

/// The GGUF metadata arrays only the tokenizer reads.
const TOKENIZER_ARRAYS: [&str; 3] = [
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
];

/// Opens a GGUF and parses its header (metadata and tensor index, no weights).
fn read_gguf(path: &Path) -> Result<(File, gguf_file::Content)> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| Error::InvalidModel {
        path: path.to_path_buf(),
        message: match e.to_string() {
            m if m.contains("unknown dtype") => format!(
                "not a readable GGUF file: {m} (a tensor type this build cannot read; requantize the file to a common type, e.g. Q4_K_M, Q8_0 or F16, with llama.cpp's llama-quantize)"
            ),
            m => format!("not a readable GGUF file: {m}"),
        },
    })?;
    Ok((file, content))
}

impl Llama {
    /// Reads a llama/qwen2 GGUF; returns the parsed content too (its tokenizer metadata).
    pub fn load_gguf(path: &Path, device: &Device) -> Result<(Self, gguf_file::Content)> {
        let (file, content) = read_gguf(path)?;
        let model = Self::from_gguf(path, file, &content, device)?;
        Ok((model, content))
    }

    /// The model whose header `content` was read from `file` (at `path`, for messages).
    fn from_gguf(
        path: &Path,
        file: File,
        content: &gguf_file::Content,
        device: &Device,
    ) -> Result<Self> {
        let config = LlamaConfig::from_gguf(content, path)?;
        let mut gguf = GgufTensors {
            content,
            file,
            path,
            device,
            eps: config.rms_norm_eps as f32,
        };
        let embed_q = Arc::new(gguf.tensor("token_embd.weight")?);
        let embed_tokens = TokenEmbedding::from_qtensor(embed_q, device)?;
        let lm_head = match content.tensor_infos.contains_key("output.weight") {
            true => gguf.linear("output", false)?,
            // Tied: the head gets its own copy (repacked for the kernels; the table stays as
            // stored for lookups).
            false => Linear::from_qtensor(gguf.tensor("token_embd.weight")?, None)?,
        };
        let final_norm = gguf.norm("output_norm.weight")?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("blk.{i}");
            layers.push(DecoderLayer {
                input_layernorm: gguf.norm(&format!("{p}.attn_norm.weight"))?,
                self_attn: Attention {
                    q_proj: gguf.linear(&format!("{p}.attn_q"), config.qkv_bias)?,
                    k_proj: gguf.linear(&format!("{p}.attn_k"), config.qkv_bias)?,
                    v_proj: gguf.linear(&format!("{p}.attn_v"), config.qkv_bias)?,
                    o_proj: gguf.linear(&format!("{p}.attn_output"), false)?,
                    num_heads: config.num_heads,
                    num_kv_heads: config.num_kv_heads,
                    head_dim: config.head_dim,
                    grouped_queries: true,
                    fused_cpu_attention: true,
                },
                post_attention_layernorm: gguf.norm(&format!("{p}.ffn_norm.weight"))?,
                mlp: Mlp {
                    gate_proj: gguf.linear(&format!("{p}.ffn_gate"), false)?,
                    up_proj: gguf.linear(&format!("{p}.ffn_up"), false)?,
                    down_proj: gguf.linear(&format!("{p}.ffn_down"), false)?,
                },
            });
        }
        let rope = Rope::new(&config, DType::F32, device)?;
        let model = Self {
            embed_tokens,
            layers,
            norm: final_norm,
            lm_head,
            rope,
            config,
            dtype: DType::F32,
            device: device.clone(),
        };
        Ok(model)
    }

    /// A model of shape `config` with random F32 weights drawn from `seed`
    /// ([`crate::init::seeded_init`]): for tests and examples that need two different models
    /// with one vocabulary, such as a draft and its target.
    pub fn random(config: LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        let map = candle_nn::VarMap::new();
        // The first pass creates the variables; the second reads them once redrawn.
        Self::from_var_builder(
            config.clone(),
            VarBuilder::from_varmap(&map, DType::F32, device),
            DType::F32,
            device,
        )?;
        crate::init::seeded_init(&map, seed)?;
        Self::from_var_builder(
            config,
            VarBuilder::from_varmap(&map, DType::F32, device),
            DType::F32,
            device,
        )
    }

    /// Reads transformers-layout weights (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn load_safetensors(
        config_path: &Path,
        weights: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let config = LlamaConfig::from_hf_json(config_path)?;
        let vb = crate::safetensors::open(weights, dtype, device)?;
        Self::from_var_builder(config, vb, dtype, device)
            .map_err(|e| crate::safetensors::corrupt(weights, e))
    }

    fn from_var_builder(
        config: LlamaConfig,
        vb: VarBuilder,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (h, kv) = (config.hidden_size, config.num_kv_heads * config.head_dim);
        let q_out = config.num_heads * config.head_dim;
        let linear = |vb: VarBuilder, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = vb.get((out, inp), "weight")?;
            let bias = if bias {
                Some(vb.get(out, "bias")?)
            } else {
                None
            };
            Linear::dense(weight, bias)
        };
        let norm = |vb: VarBuilder| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: vb.get(h, "weight")?,
                eps: config.rms_norm_eps as f32,
            })
        };
        let model_vb = vb.pp("model");
        let embed_tokens = model_vb
            .pp("embed_tokens")
            .get((config.vocab_size, h), "weight")?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let lvb = model_vb.pp(format!("layers.{i}"));
            let avb = lvb.pp("self_attn");
            let mvb = lvb.pp("mlp");
            layers.push(DecoderLayer {
                input_layernorm: norm(lvb.pp("input_layernorm"))?,
                self_attn: Attention {
                    q_proj: linear(avb.pp("q_proj"), q_out, h, config.qkv_bias)?,
                    k_proj: linear(avb.pp("k_proj"), kv, h, config.qkv_bias)?,
                    v_proj: linear(avb.pp("v_proj"), kv, h, config.qkv_bias)?,
                    o_proj: linear(avb.pp("o_proj"), h, q_out, false)?,
                    num_heads: config.num_heads,
                    num_kv_heads: config.num_kv_heads,
                    head_dim: config.head_dim,
                    grouped_queries: true,
                    fused_cpu_attention: true,
                },
                post_attention_layernorm: norm(lvb.pp("post_attention_layernorm"))?,
                mlp: Mlp {
                    gate_proj: linear(mvb.pp("gate_proj"), config.intermediate_size, h, false)?,
                    up_proj: linear(mvb.pp("up_proj"), config.intermediate_size, h, false)?,
                    down_proj: linear(mvb.pp("down_proj"), h, config.intermediate_size, false)?,
                },
            });
        }
        let lm_head = if config.tie_word_embeddings {
            Linear::dense(embed_tokens.clone(), None)?
        } else {
            linear(vb.pp("lm_head"), config.vocab_size, h, false)?
        };
        let rope = Rope::new(&config, dtype, device)?;
        Ok(Self {
            embed_tokens: TokenEmbedding::Dense(embed_tokens),
            layers,
            norm: norm(model_vb.pp("norm"))?,
            lm_head,
            rope,
            config,
            dtype,
            device: device.clone(),
        })
    }
}

/// Reads named tensors out of an open GGUF, with errors that name the file and tensor.
struct GgufTensors<'a> {
    content: &'a gguf_file::Content,
    file: File,
    path: &'a Path,
    device: &'a Device,
    eps: f32,
}

impl GgufTensors<'_> {
    fn tensor(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut self.file, name, self.device)
            .map_err(|e| Error::InvalidModel {
                path: self.path.to_path_buf(),
                message: format!("tensor `{name}`: {e} (the file may be truncated or corrupt)"),
            })
    }

    fn norm(&mut self, name: &str) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.tensor(name)?.dequantize(self.device)?,
            eps: self.eps,
        })
    }

    /// `{prefix}.weight`, plus `{prefix}.bias` when the layer has one.
    fn linear(&mut self, prefix: &str, bias: bool) -> Result<Linear> {
        let bias = match bias {
            true => Some(
                self.tensor(&format!("{prefix}.bias"))?
                    .dequantize(self.device)?,
            ),
            false => None,
        };
        Linear::from_qtensor(self.tensor(&format!("{prefix}.weight"))?, bias)
    }
}
