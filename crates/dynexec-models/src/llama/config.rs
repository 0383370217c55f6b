//! Decoder hyper-parameters, from a HF `config.json` or GGUF metadata.

use crate::Result;
use candle_core::quantized::gguf_file;
use dynexec_core::Error;
use serde::Deserialize;
use std::path::Path;

/// How RoPE pairs the features of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): llama.cpp's layout for llama GGUFs (q/k rows were permuted).
    Interleaved,
    /// Pairs (i, i+d/2): Hugging Face checkpoints and NEOX-style GGUFs (Qwen2).
    HalfSplit,
}

/// Everything the decoder needs to know about its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's gate and up projections.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads per layer; a multiple of `num_kv_heads`.
    pub num_heads: usize,
    /// Key/value heads per layer (fewer than `num_heads` with grouped-query attention).
    pub num_kv_heads: usize,
    /// Features per head; even, since RoPE rotates pairs.
    pub head_dim: usize,
    /// RMS-norm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// How RoPE pairs a head's features, which depends on the file's layout.
    pub rope_style: RopeStyle,
    /// Longest sequence the model was trained for; prompts beyond it are refused.
    pub context_length: usize,
    /// Token ids in the vocabulary (rows of the token embedding).
    pub vocab_size: usize,
    /// The LM head reuses the token embedding (no separate output weight).
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2).
    pub qkv_bias: bool,
}

/// The subset of a transformers `config.json` that llama-family models share.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

impl LlamaConfig {
    /// The weights' parameter count as llama.cpp reports it: embeddings, every layer's
    /// projections, biases and norms, the final norm, and the output head when untied.
    pub fn parameter_count(&self) -> u64 {
        let (h, kv) = (
            self.hidden_size as u64,
            (self.num_kv_heads * self.head_dim) as u64,
        );
        let q = (self.num_heads * self.head_dim) as u64;
        let attention = h * q + 2 * h * kv + q * h + if self.qkv_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * self.intermediate_size as u64;
        let layer = attention + mlp + 2 * h;
        let embeddings = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            embeddings
        };
        embeddings + self.num_layers as u64 * layer + h + head
    }

    /// Reads a transformers `config.json` of a llama, mistral or qwen2 model.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let invalid = |message: String| Error::InvalidModel {
            path: path.to_path_buf(),
            message,
        };
        let cfg: HfConfig = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("not a llama-family config.json: {e}")))?;
        let model_type = cfg.model_type.as_deref().unwrap_or("llama");
        if !matches!(model_type, "llama" | "mistral" | "qwen2") {
            return Err(invalid(format!(
                "model_type `{model_type}` is not a llama-family decoder (llama, mistral, qwen2)"
            )));
        }
        if cfg.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(invalid("rope_scaling is not supported yet".to_string()));
        }
        let config = Self {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_layers: cfg.num_hidden_layers,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
            head_dim: cfg
                .head_dim
                .unwrap_or(cfg.hidden_size / cfg.num_attention_heads.max(1)),
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta: cfg.rope_theta,
            rope_style: RopeStyle::HalfSplit,
            context_length: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
            tie_word_embeddings: cfg.tie_word_embeddings,
            qkv_bias: cfg.attention_bias || model_type == "qwen2",
        };
        config.check().map_err(invalid)?;
        Ok(config)
    }

    /// Reads the hyper-parameters of a `llama` or `qwen2` GGUF.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let invalid = |message: String| Error::InvalidModel {
            path: path.to_path_buf(),
            message,
        };
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| invalid("no general.architecture in the GGUF metadata".to_string()))?;
        let rope_style = match arch.as_str() {
            "llama" => RopeStyle::Interleaved,
            "qwen2" => RopeStyle::HalfSplit,
            other => {
                return Err(invalid(format!(
                    "architecture `{other}` is not supported (llama, qwen2 are)"
                )))
            }
        };
        let usize_key = |key: &str| -> Result<usize> {
            let full = format!("{arch}.{key}");
            let value = md
                .get(&full)
                .ok_or_else(|| invalid(format!("missing metadata `{full}`")))?;
            gguf_usize(value).ok_or_else(|| invalid(format!("metadata `{full}` is not an integer")))
        };
        let f64_key = |key: &str| {
            md.get(&format!("{arch}.{key}"))
                .and_then(|v| v.to_f32().ok())
                .map(f64::from)
        };
        let hidden_size = usize_key("embedding_length")?;
        let num_heads = usize_key("attention.head_count")?;
        let head_dim = usize_key("rope.dimension_count").unwrap_or(hidden_size / num_heads.max(1));
        let embd = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| invalid("no token_embd.weight tensor".to_string()))?;
        let vocab_size = embd.shape.dims().first().copied().unwrap_or(0);
        let config = Self {
            hidden_size,
            intermediate_size: usize_key("feed_forward_length")?,
            num_layers: usize_key("block_count")?,
            num_heads,
            num_kv_heads: usize_key("attention.head_count_kv").unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: f64_key("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: f64_key("rope.freq_base").unwrap_or(10_000.0),
            rope_style,
            context_length: usize_key("context_length")?,
            vocab_size,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        };
        config.check().map_err(invalid)?;
        Ok(config)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.num_layers == 0
            || self.num_heads == 0
            || self.num_kv_heads == 0
            || self.hidden_size == 0
        {
            return Err("layer, head and hidden sizes must be positive".to_string());
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!(
                "head dimension {} is odd; RoPE needs pairs",
                self.head_dim
            ));
        }
        Ok(())
    }
}

fn gguf_usize(value: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value::*;
    match value {
        U8(v) => Some(*v as usize),
        U16(v) => Some(*v as usize),
        U32(v) => Some(*v as usize),
        U64(v) => Some(*v as usize),
        I8(v) if *v >= 0 => Some(*v as usize),
        I16(v) if *v >= 0 => Some(*v as usize),
        I32(v) if *v >= 0 => Some(*v as usize),
        I64(v) if *v >= 0 => Some(*v as usize),
        _ => None,
    }
}
