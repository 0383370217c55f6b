//! Writing a (converted) decoder as a GGUF file that llama.cpp-compatible tools can load.
//!
//! From a GGUF source, every metadata key is kept (only `general.file_type` changes) and the
//! tensors that are not linear weights are copied byte for byte, so the written file loads into
//! exactly the model that in-place conversion gives. From safetensors, the metadata is built
//! from the config and tokenizer.json, and q/k rows are permuted into llama.cpp's interleaved
//! RoPE layout (for the `llama` architecture).

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::DType;
use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::{Error, Result};
use dynexec_models::linear::{HasLinears, WeightFormat};
use dynexec_models::llama::{Llama, RopeStyle};
use serde::Serialize;
use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::Arc;

/// Where the model being exported came from.
pub enum ExportSource<'a> {
    /// The GGUF the model was loaded from: metadata and non-linear tensors come from it.
    Gguf(&'a Path),
    /// A transformers checkpoint: metadata is built from the config and this tokenizer.
    Dense(&'a TextTokenizer),
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The file written.
    pub path: String,
    /// Format of the linear weights (other tensors keep theirs, or are F32 from safetensors).
    pub format: WeightFormat,
    /// Tensors in the file.
    pub tensors: usize,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// llama.cpp's `general.file_type` codes (LLAMA_FTYPE_MOSTLY_*).
fn file_type(format: WeightFormat) -> u32 {
    match format {
        WeightFormat::F32 => 0,
        WeightFormat::F16 => 1,
        WeightFormat::Q4_0 => 2,
        WeightFormat::Q4_1 => 3,
        WeightFormat::Q8_0 => 7,
    }
}

/// Writes `model` (whose linear layers are in `format`) to `out`.
pub fn export_gguf(
    model: &mut Llama,
    format: WeightFormat,
    source: ExportSource,
    out: &Path,
) -> Result<ExportReport> {
    let cfg = model.config().clone();
    // Transformers checkpoints pair RoPE features by halves; a llama GGUF wants them adjacent.
    let permute_qk = matches!(source, ExportSource::Dense(_))
        && cfg.rope_style == RopeStyle::HalfSplit
        && !cfg.qkv_bias;
    let mut tensors: Vec<(String, Arc<QTensor>)> = Vec::new();
    let (mut metadata, float_tensors) = match source {
        ExportSource::Gguf(path) => gguf_source(path)?,
        ExportSource::Dense(tokenizer) => {
            let float_tensors = model
                .float_tensors()?
                .into_iter()
                .map(|(name, t)| {
                    Ok((
                        name,
                        Arc::new(QTensor::quantize(
                            &t.to_dtype(DType::F32)?,
                            candle_core::quantized::GgmlDType::F32,
                        )?),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            (dense_metadata(model, tokenizer)?, float_tensors)
        }
    };
    metadata.retain(|(k, _)| k != "general.file_type");
    metadata.push((
        "general.file_type".to_string(),
        Value::U32(file_type(format)),
    ));
    tensors.extend(float_tensors);
    for (name, linear) in model.linears_mut() {
        let mut weight = linear.to_qtensor()?;
        if permute_qk {
            if name.ends_with("attn_q") {
                weight = permute_rows_for_interleaved_rope(&weight, cfg.num_heads)?;
            } else if name.ends_with("attn_k") {
                weight = permute_rows_for_interleaved_rope(&weight, cfg.num_kv_heads)?;
            }
        }
        tensors.push((format!("{name}.weight"), weight));
        if let Some(bias) = linear.bias() {
            if !tensors.iter().any(|(n, _)| n == &format!("{name}.bias")) {
                let bias = QTensor::quantize(
                    &bias.to_dtype(DType::F32)?,
                    candle_core::quantized::GgmlDType::F32,
                )?;
                tensors.push((format!("{name}.bias"), Arc::new(bias)));
            }
        }
    }
    write_file(out, &metadata, &tensors)?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(ExportReport {
        path: out.display().to_string(),
        format,
        tensors: tensors.len(),
        bytes,
    })
}

type Metadata = Vec<(String, Value)>;

/// Metadata and the non-linear tensors (embedding, norms, biases) of a GGUF file.
fn gguf_source(path: &Path) -> Result<(Metadata, Vec<(String, Arc<QTensor>)>)> {
    let invalid = |message: String| Error::InvalidModel {
        path: path.to_path_buf(),
        message,
    };
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| invalid(format!("not a readable GGUF file: {e}")))?;
    let mut names: Vec<(&String, u64)> = content
        .tensor_infos
        .iter()
        .map(|(n, i)| (n, i.offset))
        .collect();
    names.sort_by_key(|(_, offset)| *offset);
    let mut tensors = Vec::new();
    for (name, _) in names {
        let linear_weight =
            name.ends_with(".weight") && !name.contains("norm") && name != "token_embd.weight";
        if linear_weight {
            continue;
        }
        let t = content
            .tensor(&mut file, name, &candle_core::Device::Cpu)
            .map_err(|e| invalid(format!("tensor `{name}`: {e}")))?;
        tensors.push((name.clone(), Arc::new(t)));
    }
    let mut metadata: Metadata = content.metadata.into_iter().collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((metadata, tensors))
}

/// llama.cpp stores q/k rows so that RoPE pairs adjacent features; transformers pairs
/// feature i with i + d/2. Block-quantized rows are independent, so rows move as bytes.
fn permute_rows_for_interleaved_rope(weight: &QTensor, heads: usize) -> Result<Arc<QTensor>> {
    let (rows, _) = weight.shape().dims2()?;
    let data = weight.data()?;
    let row_bytes = data.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for (j, src) in [(2 * i, i), (2 * i + 1, half + i)] {
                let dst_row = h * head_dim + j;
                let src_row = h * head_dim + src;
                out[dst_row * row_bytes..(dst_row + 1) * row_bytes]
                    .copy_from_slice(&data[src_row * row_bytes..(src_row + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(
        std::borrow::Cow::Owned(out),
        &candle_core::Device::Cpu,
        weight.dtype(),
    )?;
    Ok(Arc::new(QTensor::new(storage, weight.shape().clone())?))
}

fn dense_metadata(model: &Llama, tokenizer: &TextTokenizer) -> Result<Metadata> {
    let cfg = model.config();
    // Qwen2 (q/k/v biases) keeps NEOX RoPE in GGUF; everything else is written as llama.
    let arch = if cfg.qkv_bias { "qwen2" } else { "llama" };
    let u32v = |v: usize| Value::U32(v as u32);
    let mut md: Metadata = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String("dynexec export".into()),
        ),
        (format!("{arch}.block_count"), u32v(cfg.num_layers)),
        (format!("{arch}.context_length"), u32v(cfg.context_length)),
        (format!("{arch}.embedding_length"), u32v(cfg.hidden_size)),
        (
            format!("{arch}.feed_forward_length"),
            u32v(cfg.intermediate_size),
        ),
        (format!("{arch}.attention.head_count"), u32v(cfg.num_heads)),
        (
            format!("{arch}.attention.head_count_kv"),
            u32v(cfg.num_kv_heads),
        ),
        (format!("{arch}.rope.dimension_count"), u32v(cfg.head_dim)),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(cfg.rope_theta as f32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
    ];
    md.extend(tokenizer_metadata(tokenizer)?);
    Ok(md)
}

/// `tokenizer.ggml.*` keys for a byte-level BPE tokenizer.json.
fn tokenizer_metadata(tokenizer: &TextTokenizer) -> Result<Metadata> {
    let unsupported = |what: &str| {
        Error::InvalidArgument(format!("cannot write this tokenizer into a GGUF: {what}"))
    };
    let json = serde_json::to_value(tokenizer.inner()).map_err(|e| unsupported(&e.to_string()))?;
    if json["model"]["type"] != "BPE" {
        return Err(unsupported("only byte-level BPE tokenizers are supported"));
    }
    let pre = match &json["pre_tokenizer"] {
        p if p["type"] == "ByteLevel" => "gpt-2",
        p if p["type"] == "Sequence"
            && p["pretokenizers"][0]["type"] == "Digits"
            && p["pretokenizers"][0]["individual_digits"] == true
            && p["pretokenizers"][1]["type"] == "ByteLevel" =>
        {
            "smollm"
        }
        _ => {
            return Err(unsupported(
                "its pre-tokenizer has no llama.cpp equivalent known to dynexec",
            ))
        }
    };
    let vocab: HashMap<String, u32> = tokenizer.inner().get_vocab(true);
    let mut tokens = vec![String::new(); vocab.len()];
    for (token, id) in vocab {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| unsupported("token ids are not contiguous"))?;
        *slot = token;
    }
    let special: Vec<&str> = json["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|t| t["special"] == true)
                .filter_map(|t| t["content"].as_str())
                .collect()
        })
        .unwrap_or_default();
    let token_types: Vec<Value> = tokens
        .iter()
        .map(|t| Value::I32(if special.contains(&t.as_str()) { 3 } else { 1 }))
        .collect();
    let merges: Vec<Value> = json["model"]["merges"]
        .as_array()
        .ok_or_else(|| unsupported("no merges"))?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(pair) if pair.len() == 2 => Ok(Value::String(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            ))),
            _ => Err(unsupported("malformed merges")),
        })
        .collect::<Result<_>>()?;
    let with_specials = tokenizer
        .inner()
        .encode("a", true)
        .map_err(|e| unsupported(&e.to_string()))?;
    let without = tokenizer
        .inner()
        .encode("a", false)
        .map_err(|e| unsupported(&e.to_string()))?;
    let bos = (with_specials.get_ids().len() > without.get_ids().len())
        .then(|| with_specials.get_ids()[0]);
    let mut md: Metadata = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(token_types),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(bos.is_some()),
        ),
    ];
    if let Some(bos) = bos {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(&eos) = tokenizer.eos_ids.first() {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    if let Some(template) = &tokenizer.chat_template_source {
        md.push((
            "tokenizer.chat_template".into(),
            Value::String(template.clone()),
        ));
    }
    Ok(md)
}

fn write_file(out: &Path, metadata: &Metadata, tensors: &[(String, Arc<QTensor>)]) -> Result<()> {
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_ref()))
        .collect();
    let partial = out.with_extension("gguf.partial");
    let file = File::create(&partial).map_err(|e| Error::io(&partial, e))?;
    let mut writer = BufWriter::new(file);
    gguf_file::write(&mut writer, &md, &ts)?;
    drop(writer);
    std::fs::rename(&partial, out).map_err(|e| Error::io(out, e))?;
    Ok(())
}
