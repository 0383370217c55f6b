//! Gaussian noise from a seeded generator, so a seed gives the same image on every run and
//! device (candle's own CPU generator cannot be seeded).

use candle_core::{Device, Tensor};
use dynexec_core::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `count` standard normal values drawn from `rng` (Box–Muller).
pub fn normal_values(rng: &mut StdRng, count: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(count + 1);
    while out.len() < count {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let v: f64 = rng.random();
        let radius = (-2.0 * u.ln()).sqrt();
        let angle = std::f64::consts::TAU * v;
        out.push((radius * angle.cos()) as f32);
        out.push((radius * angle.sin()) as f32);
    }
    out.truncate(count);
    out
}

/// One generator per sample: sample `i` of a batch always draws from its own seed, so an
/// image does not depend on what else is in its batch.
pub fn generators(seeds: &[u64]) -> Vec<StdRng> {
    seeds.iter().map(|&s| StdRng::seed_from_u64(s)).collect()
}

/// A `(seeds.len(), sample_dims…)` batch of standard normal noise, row `i` from `rngs[i]`.
pub fn batch_noise(rngs: &mut [StdRng], sample_dims: &[usize], device: &Device) -> Result<Tensor> {
    let per_sample: usize = sample_dims.iter().product();
    let mut values = Vec::with_capacity(per_sample * rngs.len());
    for rng in rngs.iter_mut() {
        values.extend(normal_values(rng, per_sample));
    }
    let mut dims = vec![rngs.len()];
    dims.extend_from_slice(sample_dims);
    Ok(Tensor::from_vec(values, dims, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_noise_and_its_moments_are_standard() {
        let a = normal_values(&mut StdRng::seed_from_u64(7), 20001);
        let b = normal_values(&mut StdRng::seed_from_u64(7), 20001);
        let c = normal_values(&mut StdRng::seed_from_u64(8), 20001);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
