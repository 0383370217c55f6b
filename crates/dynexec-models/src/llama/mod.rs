//! Llama-family decoder (SmolLM2, Llama 2/3, Mistral, Qwen2) with addressable depth.
//!
//! `embed` → `forward_layers(a..b)` → `head` are separate calls, so early exit, layer-skip
//! drafting and hidden-state taps reuse this one implementation. State lives outside the
//! model in a [`KvCache`], so one loaded model serves many sequences.

mod config;
mod embedding;
mod load;

pub use config::{LlamaConfig, RopeStyle};
pub use embedding::TokenEmbedding;
pub use load::{load_decoder, LoadedDecoder};

use crate::cpu_kernels::CachedAttention;
use crate::kv_cache::KvCache;
use crate::linear::{CpuKernels, HasLinears, Linear};
use crate::Result;
use candle_core::{DType, Device, Tensor, D};
use dynexec_core::trace::Trace;
use dynexec_core::Error;
use std::ops::Range;

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Attend with the query heads of each KV head stacked into one product, instead of
    /// copying every cached key and value once per query head (see [`Attention::attend`]).
    grouped_queries: bool,
    /// On the CPU in F32, attend with [`CachedAttention`] rather than tensor ops.
    fused_cpu_attention: bool,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up] = Linear::forward_shared_input([&self.gate_proj, &self.up_proj], x)?;
        self.down_proj
            .forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// The pre-norm residual block, with `attend` mapping the normed input to the attention
    /// output (over one cache, or one per row).
    fn forward(
        &self,
        x: &Tensor,
        attend: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let x_attn = (attend(&self.input_layernorm.forward(x)?)? + x)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x_attn)?)?;
        Ok((mlp + x_attn)?)
    }
}

/// Rotary position embedding tables, `(context, head_dim / 2)`.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl Rope {
    fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / cfg.head_dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, cfg.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.context_length, 1))?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
            style: cfg.rope_style,
        })
    }

    /// Rotates `(batch, heads, seq, head_dim)` for positions `offset..offset + seq`.
    fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        let x = x.contiguous()?;
        Ok(match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
            RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
        })
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        offset: usize,
    ) -> Result<Tensor> {
        let (batch, seq, _) = x.dims3()?;
        let [q, k, v] =
            Linear::forward_shared_input([&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let q = q.reshape((batch, seq, self.num_heads, self.head_dim))?;
        let q = rope.apply(&q.transpose(1, 2)?, offset)?;
        let (k, v) = self.kv_heads(k, v, rope, offset)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        let out = self.attend(&q, &k, &v, seq, offset)?;
        self.o_proj.forward(&out)
    }

    /// New tokens for each of several sequences: `x` is `(1, rows, hidden)` (already
    /// normed), its rows in segments of `lens[i]` consecutive rows for the sequence whose
    /// cache is `caches[i]`. The projections run once for all rows (the weights are read
    /// once); attention runs per segment, as [`Self::forward`] would for that sequence alone.
    fn forward_segments(
        &self,
        x: &Tensor,
        rope: &Rope,
        caches: &mut [&mut KvCache],
        lens: &[usize],
        layer: usize,
    ) -> Result<Tensor> {
        let [q, k, v] =
            Linear::forward_shared_input([&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let mut outs = Vec::with_capacity(caches.len());
        let mut start = 0;
        for (cache, &len) in caches.iter_mut().zip(lens) {
            let offset = cache.layer_len(layer);
            let q = q
                .narrow(1, start, len)?
                .reshape((1, len, self.num_heads, self.head_dim))?;
            let q = rope.apply(&q.transpose(1, 2)?, offset)?;
            let (k, v) = self.kv_heads(
                k.narrow(1, start, len)?,
                v.narrow(1, start, len)?,
                rope,
                offset,
            )?;
            let (k, v) = cache.append(layer, &k, &v)?;
            outs.push(self.attend(&q, &k, &v, len, offset)?);
            start += len;
        }
        self.o_proj.forward(&Tensor::cat(&outs, 1)?)
    }

    /// Attention of rotated queries `(1|b, heads, seq, d)` over cached keys and values,
    /// merged back to `(b, seq, heads * d)`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seq: usize,
        offset: usize,
    ) -> Result<Tensor> {
        let batch = q.dim(0)?;
        let kv_len = k.dim(2)?;
        let group = self.num_heads / self.num_kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mask = |rows: usize| match seq {
            1 => Ok(None),
            _ => causal_mask(seq, offset, kv_len, q.dtype(), q.device()).map(|m| Some((rows, m))),
        };
        let out = if self.grouped_queries
            && self.fused_cpu_attention
            && q.device().is_cpu()
            && q.dtype() == DType::F32
        {
            // One op: each query head a task on the kernels' pool, keys and values read in
            // place (see `CachedAttention`).
            let op = CachedAttention {
                scale: scale as f32,
                group,
            };
            q.contiguous()?.apply_op3_no_bwd(k, v, &op)?
        } else if self.grouped_queries {
            // The `group` query heads sharing a KV head become rows of one product against
            // that head's keys and values, read in place from the cache.
            let q = q.reshape((batch, self.num_kv_heads, group * seq, self.head_dim))?;
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let scores = match mask(group)? {
                None => scores,
                Some((group, mask)) => scores
                    .reshape((batch, self.num_kv_heads, group, seq, kv_len))?
                    .broadcast_add(&mask)?
                    .reshape((batch, self.num_kv_heads, group * seq, kv_len))?,
            };
            candle_nn::ops::softmax_last_dim(&scores)?
                .matmul(v)?
                .reshape((batch, self.num_heads, seq, self.head_dim))?
        } else {
            // K/V repeated per query head, as the reference implementations do, so
            // `--cpu-kernels candle` stays bit-identical to them (stacking the query heads
            // reorders the sums, and the quantized layers amplify that to ~1 logit).
            let k = repeat_kv(k, group)?;
            let v = repeat_kv(v, group)?;
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let scores = match mask(1)? {
                None => scores,
                Some((_, mask)) => scores.broadcast_add(&mask)?,
            };
            candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?
        };
        Ok(out
            .transpose(1, 2)?
            .reshape((batch, seq, self.num_heads * self.head_dim))?)
    }

    /// Projected keys and values `(batch, seq, kv_heads * head_dim)` as
    /// `(batch, kv_heads, seq, head_dim)`, the keys rotated.
    fn kv_heads(
        &self,
        k: Tensor,
        v: Tensor,
        rope: &Rope,
        offset: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (batch, seq, _) = k.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, self.num_kv_heads, self.head_dim))?
                .transpose(1, 2)?)
        };
        let k = rope.apply(&heads(k)?, offset)?;
        let v = heads(v)?.contiguous()?;
        Ok((k, v))
    }

    /// Appends this layer's keys and values for `x` (already normed) without attending.
    fn fill_kv(
        &self,
        x: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        offset: usize,
    ) -> Result<()> {
        let [k, v] = Linear::forward_shared_input([&self.k_proj, &self.v_proj], x)?;
        let (k, v) = self.kv_heads(k, v, rope, offset)?;
        cache.append(layer, &k, &v)?;
        Ok(())
    }
}

/// `(b, kv_heads, n, d)` → `(b, kv_heads * group, n, d)`, each KV head repeated `group` times.
fn repeat_kv(x: &Tensor, group: usize) -> Result<Tensor> {
    if group == 1 {
        return Ok(x.clone());
    }
    let (b, kv_heads, n, d) = x.dims4()?;
    Ok(Tensor::cat(&vec![x; group], 2)?.reshape((b, kv_heads * group, n, d))?)
}

/// Additive mask `(seq, kv_len)`: query `i` (at position `offset + i`) sees keys `<= offset + i`.
fn causal_mask(
    seq: usize,
    offset: usize,
    kv_len: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let rows = Tensor::arange(offset as u32, (offset + seq) as u32, device)?.reshape((seq, 1))?;
    let cols = Tensor::arange(0u32, kv_len as u32, device)?.reshape((1, kv_len))?;
    let future = cols.broadcast_gt(&rows)?;
    let zeros = Tensor::zeros((seq, kv_len), dtype, device)?;
    let neg_inf = Tensor::full(f32::NEG_INFINITY, (seq, kv_len), device)?.to_dtype(dtype)?;
    Ok(future.where_cond(&neg_inf, &zeros)?)
}

/// An LM head over some of the vocabulary's tokens ([`Llama::vocab_subset`]).
#[derive(Debug, Clone)]
pub struct VocabSubset {
    head: Linear,
    ids: Vec<u32>,
}

impl VocabSubset {
    /// The token ids its logits stand for, in logit order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// A loaded llama-family decoder.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: TokenEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    config: LlamaConfig,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Caps the context at `tokens` (llama.cpp's `-c/--ctx-size`): prompts and generations
    /// longer than that are refused, so KV memory stays within `tokens` positions per
    /// sequence. It cannot exceed the context the model was trained for.
    pub fn limit_context(&mut self, tokens: usize) -> Result<()> {
        let trained = self.config.context_length;
        if tokens == 0 || tokens > trained {
            return Err(Error::setting(
                dynexec_core::Setting::ContextSize,
                format!("must be between 1 and {trained}, the context this model was trained for"),
            ));
        }
        self.config.context_length = tokens;
        Ok(())
    }

    /// The hyper-parameters it was built from.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Decoder layers: the depth that early exit and layer drafts address.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The device its weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Activation dtype (F32 for quantized weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Rows of the LM head: the logits' width.
    pub fn vocab_size(&self) -> usize {
        self.lm_head.out_features()
    }

    /// Bytes of all weights as stored (quantized blocks count at their packed size).
    pub fn weight_bytes(&self) -> usize {
        let norm = |n: &RmsNorm| n.weight.elem_count() * n.weight.dtype().size_in_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                let m = &l.mlp;
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
                .iter()
                .map(|lin| lin.weight_bytes())
                .sum::<usize>()
                    + norm(&l.input_layernorm)
                    + norm(&l.post_attention_layernorm)
            })
            .sum();
        let embed = self.embed_tokens.bytes();
        // The head counts on its own: from a GGUF, or once converted, it is a separate copy
        // (a dense safetensors head tied to the embedding shares it and is counted twice).
        let head = self.lm_head.weight_bytes();
        layers + embed + head + norm(&self.norm)
    }

    /// Whether the CPU attends with its own attention op (the default) or with the tensor ops
    /// GPUs run; both compute the same attention, up to float rounding. For checking the GPU
    /// path where there is no GPU, and for comparing the two.
    pub fn set_fused_cpu_attention(&mut self, fused: bool) {
        for layer in &mut self.layers {
            layer.self_attn.fused_cpu_attention = fused;
        }
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Token ids `(batch, seq)` → hidden states `(batch, seq, hidden)`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let rows = self.embed_tokens.rows(&flat)?;
        Ok(rows.reshape((batch, seq, self.config.hidden_size))?)
    }

    /// Runs layers `layers` on `hidden` (positions continue each layer's cache). Records the
    /// residual stream after each layer `l` as trace layer `l + 1` (and the input as layer 0
    /// when the range starts at 0).
    pub fn forward_layers(
        &self,
        hidden: &Tensor,
        layers: Range<usize>,
        cache: &mut KvCache,
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        if layers.end > self.layers.len() || layers.start > layers.end {
            return Err(Error::InvalidArgument(format!(
                "layer range {}..{} is outside the model's {} layers",
                layers.start,
                layers.end,
                self.layers.len()
            )));
        }
        let seq = hidden.dim(1)?;
        if layers.start == 0 {
            if let Some(t) = trace.as_deref_mut() {
                t.record(0, hidden)?;
            }
        }
        let mut x = hidden.clone();
        for l in layers {
            let offset = cache.layer_len(l);
            if offset + seq > self.config.context_length {
                return Err(Error::ContextOverflow {
                    prompt_tokens: offset,
                    requested: seq,
                    context: self.config.context_length,
                });
            }
            let layer = &self.layers[l];
            x = layer.forward(&x, |h| {
                layer.self_attn.forward(h, &self.rope, cache, l, offset)
            })?;
            if let Some(t) = trace.as_deref_mut() {
                t.record(l + 1, &x)?;
            }
        }
        Ok(x)
    }

    /// Per-token early exit (CALM): keys and values of `layers` for positions whose hidden
    /// state left the model early, computed from that exited state, so later tokens can attend
    /// to those positions in the layers they skipped.
    pub fn fill_kv(
        &self,
        hidden: &Tensor,
        layers: Range<usize>,
        cache: &mut KvCache,
    ) -> Result<()> {
        if layers.end > self.layers.len() {
            return Err(Error::InvalidArgument(format!(
                "layer range {}..{} is outside the model's {} layers",
                layers.start,
                layers.end,
                self.layers.len()
            )));
        }
        for l in layers {
            let layer = &self.layers[l];
            let offset = cache.layer_len(l);
            let x = layer.input_layernorm.forward(hidden)?;
            layer.self_attn.fill_kv(&x, &self.rope, cache, l, offset)?;
        }
        Ok(())
    }

    /// The final norm's weight and epsilon and the LM head as a dense F32 `(vocab, hidden)`
    /// matrix: what training something that feeds the head needs (the fused norm and the
    /// quantized kernels have no backward pass).
    pub fn head_parts(&self) -> Result<(Tensor, f32, Tensor)> {
        Ok((
            self.norm.weight.to_dtype(DType::F32)?,
            self.norm.eps,
            self.lm_head.float_weight()?.to_dtype(DType::F32)?,
        ))
    }

    /// Final norm + LM head: hidden `(batch, seq, hidden)` → logits `(batch, seq, vocab)`.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(&self.norm.forward(hidden)?)
    }

    /// The LM head restricted to the tokens `ids` (FR-Spec, Zhao et al. 2025: a draft that
    /// proposes only frequent tokens skips most of a large vocabulary's head). Duplicate or
    /// out-of-vocabulary ids are refused.
    pub fn vocab_subset(&self, ids: &[u32]) -> Result<VocabSubset> {
        let mut seen = vec![false; self.vocab_size()];
        for &id in ids {
            match seen.get_mut(id as usize) {
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "token id {id} is outside the model's vocabulary of {}",
                        self.vocab_size()
                    )))
                }
                Some(true) => {
                    return Err(Error::InvalidArgument(format!(
                        "token id {id} appears twice in the vocabulary subset"
                    )))
                }
                Some(s) => *s = true,
            }
        }
        Ok(VocabSubset {
            head: self.lm_head.select_rows(ids)?,
            ids: ids.to_vec(),
        })
    }

    /// Final norm + the subset's head: hidden `(batch, seq, hidden)` → logits over the
    /// subset's tokens `(batch, seq, subset)`, equal to [`Self::head`]'s for those tokens.
    pub fn head_over(&self, hidden: &Tensor, subset: &VocabSubset) -> Result<Tensor> {
        subset.head.forward(&self.norm.forward(hidden)?)
    }

    /// Runs every layer on new tokens and returns logits for each of them, `(seq, vocab)`.
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let hidden = self.run_all_layers(ids, cache, trace)?;
        Ok(self.head(&hidden)?.squeeze(0)?)
    }

    /// Like [`Self::forward`] but applies the head to the last position only, `(vocab,)`:
    /// what a prefill needs, and much cheaper than a full-vocabulary head per prompt token.
    pub fn forward_last(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let hidden = self.run_all_layers(ids, cache, trace)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
        Ok(self.head(&last)?.flatten_all()?)
    }

    /// One decoding step for several sequences at once: `ids[i]` is the next token of the
    /// sequence whose cache is `caches[i]`; returns next-token logits `(rows, vocab)`. Every
    /// linear layer runs once on all rows, so a step for many sequences costs far less than
    /// one step each; each row's result matches [`Self::forward_last`] on its own.
    pub fn forward_batch(&self, ids: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        if ids.len() != caches.len() || ids.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "a batched step needs one token per sequence: {} tokens for {} sequences",
                ids.len(),
                caches.len()
            )));
        }
        let segments: Vec<&[u32]> = ids.chunks(1).collect();
        self.forward_segments(&segments, caches)
    }

    /// Several sequences' new tokens in one pass: `segments[i]` (at least one token) continues
    /// the sequence whose cache is `caches[i]`; returns logits for every row `(total rows,
    /// vocab)`, segment after segment. Each segment's rows equal [`Self::forward`] on that
    /// sequence alone (the kernels give every row the same arithmetic whatever the batch):
    /// speculative verifications of several sequences, and plain decoding steps, share one
    /// pass over the weights.
    pub fn forward_segments(
        &self,
        segments: &[&[u32]],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let x = self.hidden_segments(segments, caches)?;
        Ok(self.head(&x)?.squeeze(0)?)
    }

    /// [`Self::forward_segments`] without the final norm and head: the last layer's hidden
    /// states `(1, total rows, hidden)`, for callers that need the head on a few rows only.
    pub fn hidden_segments(
        &self,
        segments: &[&[u32]],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        self.hidden_segments_traced(segments, caches, &mut [])
    }

    /// [`Self::hidden_segments`] that also records each segment's rows in its trace:
    /// `traces[i]`, when present, continues segment `i`'s sequence (missing entries trace
    /// nothing). Each row is the same bits [`Self::forward`] would record for that sequence
    /// alone (the kernels give every row the same arithmetic whatever the batch).
    pub fn hidden_segments_traced(
        &self,
        segments: &[&[u32]],
        caches: &mut [&mut KvCache],
        traces: &mut [Option<&mut Trace>],
    ) -> Result<Tensor> {
        if segments.len() != caches.len()
            || traces.len() > segments.len()
            || segments.is_empty()
            || segments.iter().any(|s| s.is_empty())
        {
            return Err(Error::InvalidArgument(format!(
                "a batched pass needs one non-empty run of tokens per sequence (and at most one trace each): {} runs for {} sequences, {} traces",
                segments.len(),
                caches.len(),
                traces.len()
            )));
        }
        let ids: Vec<u32> = segments.concat();
        self.check_ids(&ids)?;
        if let Some((cache, segment)) = caches
            .iter()
            .zip(segments)
            .find(|(c, s)| c.len() + s.len() > self.config.context_length)
        {
            return Err(Error::ContextOverflow {
                prompt_tokens: cache.len(),
                requested: segment.len(),
                context: self.config.context_length,
            });
        }
        let lens: Vec<usize> = segments.iter().map(|s| s.len()).collect();
        // Rows go along the sequence axis: `(1, rows, hidden)`, one matmul row each.
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut x = self.embed(&ids)?;
        let mut record = |layer: usize, x: &Tensor| -> Result<()> {
            let mut start = 0;
            for (len, trace) in lens.iter().zip(traces.iter_mut()) {
                if let Some(trace) = trace.as_deref_mut().filter(|t| t.wants(layer)) {
                    // A copy of the segment's rows: a view would keep every sequence's rows
                    // of this step alive for as long as the trace lives (`record` copies
                    // already when it converts the dtype).
                    let rows = x.narrow(1, start, *len)?;
                    let rows = match rows.dtype() {
                        DType::F32 => rows.copy()?,
                        _ => rows,
                    };
                    trace.record(layer, &rows)?;
                }
                start += len;
            }
            Ok(())
        };
        record(0, &x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, |h| {
                layer
                    .self_attn
                    .forward_segments(h, &self.rope, caches, &lens, l)
            })?;
            record(l + 1, &x)?;
        }
        Ok(x)
    }

    /// Logits of the last position after only the first `depth` layers (then the final norm
    /// and the shared head): a layer-skip draft of this model.
    pub fn forward_last_at_depth(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        depth: usize,
    ) -> Result<Tensor> {
        let last = self.last_hidden_at_depth(ids, cache, depth)?;
        Ok(self.head(&last)?.flatten_all()?)
    }

    /// The residual stream of the last position after the first `depth` layers, `(1, 1,
    /// hidden)`.
    pub fn last_hidden_at_depth(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        depth: usize,
    ) -> Result<Tensor> {
        let hidden = self.run_layers(ids, cache, None, depth.min(self.layers.len()))?;
        Ok(hidden.narrow(1, hidden.dim(1)? - 1, 1)?)
    }

    fn run_all_layers(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        self.run_layers(ids, cache, trace, self.layers.len())
    }

    fn run_layers(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        trace: Option<&mut Trace>,
        depth: usize,
    ) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::InvalidArgument(
                "no tokens to run: the prompt is empty".to_string(),
            ));
        }
        self.check_ids(ids)?;
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let hidden = self.embed(&ids)?;
        self.forward_layers(&hidden, 0..depth, cache, trace)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            Some(bad) => Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the model's vocabulary of {}: the tokenizer does not match the model",
                self.config.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// The tensors that are not linear weights, GGUF-named: the embedding table and the norms.
    pub fn float_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "token_embd.weight".to_string(),
            self.embed_tokens.to_dense()?,
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            out.push((
                format!("blk.{i}.attn_norm.weight"),
                layer.input_layernorm.weight.clone(),
            ));
            out.push((
                format!("blk.{i}.ffn_norm.weight"),
                layer.post_attention_layernorm.weight.clone(),
            ));
        }
        out.push(("output_norm.weight".to_string(), self.norm.weight.clone()));
        Ok(out)
    }

    /// Log-softmax-free helper: the most likely next token for each row of `(seq, vocab)`.
    pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
        Ok(logits.argmax(D::Minus1)?.to_vec1()?)
    }
}

impl HasLinears for Llama {
    /// GGUF names; the LM head is `output` (tied or not).
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for (name, linear) in [
                ("attn_q", &mut a.q_proj),
                ("attn_k", &mut a.k_proj),
                ("attn_v", &mut a.v_proj),
                ("attn_output", &mut a.o_proj),
                ("ffn_gate", &mut m.gate_proj),
                ("ffn_up", &mut m.up_proj),
                ("ffn_down", &mut m.down_proj),
            ] {
                out.push((format!("blk.{i}.{name}"), linear));
            }
        }
        out.push(("output".to_string(), &mut self.lm_head));
        out
    }

    /// Also arranges attention as candle-transformers does under candle's kernels, so that
    /// mode stays bit-identical to it.
    fn set_cpu_kernels(&mut self, kernel: CpuKernels) {
        for (_, linear) in self.linears_mut() {
            linear.set_cpu_kernels(kernel);
        }
        for layer in &mut self.layers {
            layer.self_attn.grouped_queries = kernel == CpuKernels::Dynexec;
        }
    }
}
