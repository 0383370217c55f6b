//! Linear-layer kernels at SmolLM2's shapes, for every weight format dynexec converts to, and
//! Q4_K/Q6_K where the input size allows (576x1536).
//! Run: `cargo bench --profile dev --bench matmul` (the dev profile reuses the test build).
//! Pin threads with RAYON_NUM_THREADS for comparable numbers.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dynexec_models::linear::{Linear, WeightFormat};

/// (out_features, in_features): q/o projections, MLP up/gate, MLP down, LM head.
const SHAPES: [(usize, usize); 4] = [(576, 576), (1536, 576), (576, 1536), (49152, 576)];

fn deterministic(rows: usize, cols: usize, seed: f32) -> Tensor {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32 + seed) * 12.9898).sin() * 0.1)
        .collect();
    Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("tensor")
}

fn matmul(c: &mut Criterion) {
    for (out_features, in_features) in SHAPES {
        let dense =
            Linear::dense(deterministic(out_features, in_features, 0.5), None).expect("linear");
        let mut group = c.benchmark_group(format!("linear_{out_features}x{in_features}"));
        group.sample_size(10);
        for format in [
            WeightFormat::F32,
            WeightFormat::F16,
            WeightFormat::Q8_0,
            WeightFormat::Q4_0,
            WeightFormat::Q4_1,
        ] {
            let layer = dense.convert(format).expect("convert");
            bench_rows(&mut group, format.name(), &layer, out_features, in_features);
        }
        // The K-quants of Q4_K_M files, where the input size is whole 256-value super-blocks.
        if in_features % 256 == 0 {
            let weight = deterministic(out_features, in_features, 0.5);
            for (name, dtype) in [("q4_k", GgmlDType::Q4K), ("q6_k", GgmlDType::Q6K)] {
                let q = QTensor::quantize(&weight, dtype).expect("quantize");
                let layer = Linear::from_qtensor(q, None).expect("linear");
                bench_rows(&mut group, name, &layer, out_features, in_features);
            }
        }
        group.finish();
    }
}

/// Decode (1 row), speculative verification (8) and prefill (64).
fn bench_rows(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    layer: &Linear,
    out_features: usize,
    in_features: usize,
) {
    for batch in [1usize, 8, 64] {
        let x = deterministic(batch, in_features, 3.0);
        group.throughput(Throughput::Elements(
            (batch * out_features * in_features) as u64,
        ));
        group.bench_with_input(
            BenchmarkId::new(name, format!("batch{batch}")),
            &x,
            |b, x| b.iter(|| layer.forward(x).expect("forward")),
        );
    }
}

criterion_group!(benches, matmul);
criterion_main!(benches);
