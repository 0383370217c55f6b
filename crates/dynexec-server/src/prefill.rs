//! How much of a prompt one step may prefill. A prompt row costs its linear layers, the same
//! at any depth, plus attention over every earlier position, which grows with depth: deep in
//! an 8K context a SmolLM2 row costs 3.6 times a row at its start. The step budget counts rows
//! at their cost, in rows at the start of the context, so pieces shrink as a prompt goes
//! deeper and every step takes about the same time; short prompts at the start go several
//! to a step.

use dynexec_models::llama::LlamaConfig;

/// The cost model of one decoder.
#[derive(Debug, Clone, Copy)]
pub struct PieceCost {
    /// Earlier positions whose attention costs as much as a row's linear layers.
    positions_per_row: f64,
}

impl PieceCost {
    /// From the decoder's shapes: per layer, a row's linear layers take
    /// `2 * hidden * (q + k + v + o + 3 * intermediate)` flops, and attention over one earlier
    /// position `4 * heads * head_dim` (a score and a weighted value).
    pub fn for_model(config: &LlamaConfig) -> Self {
        let h = config.hidden_size as f64;
        let q = (config.num_heads * config.head_dim) as f64;
        let kv = (config.num_kv_heads * config.head_dim) as f64;
        let linear = 2.0 * h * (q + 2.0 * kv + q + 3.0 * config.intermediate_size as f64);
        let attention = 4.0 * q;
        Self {
            positions_per_row: (linear / attention.max(1.0)).max(1.0),
        }
    }

    /// The cost of `len` rows after `cached` positions, in rows at the start of a context.
    pub fn cost(&self, cached: usize, len: usize) -> f64 {
        let mean_depth = cached as f64 + (len as f64 + 1.0) / 2.0;
        len as f64 * (1.0 + mean_depth / self.positions_per_row)
    }

    /// The longest piece (1 to `remaining` rows) after `cached` positions that fits `budget`;
    /// a single row always goes, whatever it costs.
    pub fn piece_len(&self, cached: usize, remaining: usize, budget: f64) -> usize {
        // cost(len) = len^2 / 2k + len (1 + (cached + 1/2) / k): solve cost = budget.
        let k = self.positions_per_row;
        let (a, b) = (0.5 / k, 1.0 + (cached as f64 + 0.5) / k);
        let root = (-b + (b * b + 4.0 * a * budget.max(0.0)).sqrt()) / (2.0 * a);
        let mut len = (root.floor() as usize).clamp(1, remaining.max(1));
        while len > 1 && self.cost(cached, len) > budget {
            len -= 1;
        }
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynexec_models::llama::RopeStyle;

    fn smollm2() -> LlamaConfig {
        LlamaConfig {
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_style: RopeStyle::HalfSplit,
            context_length: 8192,
            vocab_size: 49152,
            tie_word_embeddings: true,
            qkv_bias: false,
        }
    }

    #[test]
    fn pieces_shrink_with_depth_and_always_fit() {
        let cost = PieceCost::for_model(&smollm2());
        assert!((cost.positions_per_row - 3072.0).abs() < 2.0, "{cost:?}");
        let start = cost.piece_len(0, 10_000, 256.0);
        let deep = cost.piece_len(8000, 10_000, 256.0);
        assert!((240..=256).contains(&start), "{start}");
        assert!((60..=80).contains(&deep), "{deep}");
        let mut last = usize::MAX;
        for cached in (0..8000).step_by(500) {
            let len = cost.piece_len(cached, 10_000, 256.0);
            assert!(len <= last && cost.cost(cached, len) <= 256.0);
            assert!(
                cost.cost(cached, len + 1) > 256.0,
                "{cached}: {len} is not the longest"
            );
            last = len;
        }
        // Never more than what is left, never nothing.
        assert_eq!(cost.piece_len(0, 30, 256.0), 30);
        assert_eq!(cost.piece_len(8000, 10_000, 0.5), 1);
    }
}
