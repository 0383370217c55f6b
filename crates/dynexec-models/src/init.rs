//! Reproducible initialisation of trainable variables (candle's CPU generator cannot be
//! seeded).

use crate::Result;
use candle_core::Tensor;
use dynexec_core::Error;
use rand::{Rng, SeedableRng};

/// Redraws every variable of `map` from a generator seeded with `seed`, in name order, so
/// training is reproducible: matrices and kernels normal with standard deviation
/// sqrt(gain / fan-in) (gain 2 for names containing `conv`, which feed ReLU/SiLU; 1
/// otherwise), normalisation scales (1-d `…norm….weight`) one, other vectors (biases) zero.
pub fn seeded_init(map: &candle_nn::VarMap, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data = map
        .data()
        .lock()
        .map_err(|_| Error::InvalidArgument("variable map poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let values: Vec<f32> = if dims.len() < 2 {
            let is_scale = name.contains("norm") && name.ends_with(".weight");
            vec![if is_scale { 1.0 } else { 0.0 }; var.elem_count()]
        } else {
            let fan_in: usize = dims[1..].iter().product();
            let gain = if name.contains("conv") { 2.0 } else { 1.0 };
            let std = (gain / fan_in as f32).sqrt();
            (0..var.elem_count())
                .map(|_| {
                    // Box-Muller: one standard normal from two uniforms.
                    let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                    std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
                })
                .collect()
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}
