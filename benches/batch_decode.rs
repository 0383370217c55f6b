//! One decoding step for N concurrent sequences of SmolLM2: batched (`forward_batch`, one
//! matmul per layer for all rows) against one forward per sequence. Run:
//! `cargo bench --profile dev --bench batch_decode` after `dynexec models pull smollm2-135m-instruct`.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dynexec_hub::Hub;
use dynexec_models::kv_cache::KvCache;
use dynexec_models::llama::Llama;

/// Sequences with 64 cached positions each, as in a server mid-generation.
fn caches(model: &Llama, n: usize) -> Vec<KvCache> {
    (0..n)
        .map(|i| {
            let mut cache = model.new_cache();
            let ids: Vec<u32> = (0..64)
                .map(|t| 100 + ((t * 7 + i * 13) % 5000) as u32)
                .collect();
            model.forward_last(&ids, &mut cache, None).expect("prefill");
            cache
        })
        .collect()
}

fn batch_decode(c: &mut Criterion) {
    let files = Hub::from_env()
        .and_then(|h| h.resolve("smollm2-135m-instruct"))
        .expect("run `dynexec models pull smollm2-135m-instruct` first");
    let gguf = files.find(".gguf").expect("gguf");
    let (model, _) = Llama::load_gguf(gguf, &Device::Cpu).expect("load");
    let mut group = c.benchmark_group("decode_step");
    group.sample_size(10);
    for n in [1usize, 4, 16] {
        let start = caches(&model, n);
        let ids: Vec<u32> = (0..n as u32).map(|i| 200 + i).collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("batched", n), |b| {
            b.iter_batched(
                || start.clone(),
                |mut caches| {
                    let mut refs: Vec<_> = caches.iter_mut().collect();
                    model.forward_batch(&ids, &mut refs).expect("step")
                },
                criterion::BatchSize::LargeInput,
            )
        });
        group.bench_function(BenchmarkId::new("one_at_a_time", n), |b| {
            b.iter_batched(
                || start.clone(),
                |mut caches| {
                    for (cache, &id) in caches.iter_mut().zip(&ids) {
                        model.forward_last(&[id], cache, None).expect("step");
                    }
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, batch_decode);
criterion_main!(benches);
