//! Training the text-UNet: the DDPM ε-prediction loss with AdamW, prompts dropped at random
//! so one network learns the conditional and unconditional models classifier-free guidance
//! mixes, and an exponential moving average of the weights (what gets saved).

use crate::noise::normal_values;
use crate::schedule::NoiseSchedule;
use crate::text_unet::{from_pixels, DiffusionTraining};
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use dynexec_core::{Error, Result, Setting};
use dynexec_models::unet::Unet;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Training images with, for each, the embeddings of the prompts that describe its class.
pub struct TrainingSet<'a> {
    /// u8 grey images `(n, h, w)`.
    pub images: &'a Tensor,
    /// Class index of each image.
    pub labels: &'a [usize],
    /// Per class, the embeddings `(prompts, dim)` of the prompts describing it.
    pub class_prompts: &'a [Tensor],
}

/// Progress reports.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Step `step` of `total` finished with this loss.
    Step {
        /// Steps finished so far, counting this one (1-based).
        step: usize,
        /// Steps the whole run takes (`options.steps`).
        total: usize,
        /// This step's loss: mean squared error between the predicted and the added noise over the batch.
        loss: f32,
    },
}

/// Trains `unet` (whose variables are `varmap`'s) for `options.steps` steps, then loads the
/// weights' moving average into `varmap`. Returns the mean loss of the last 100 steps.
pub fn train(
    unet: &Unet,
    varmap: &VarMap,
    data: &TrainingSet,
    schedule: &NoiseSchedule,
    options: &DiffusionTraining,
    mut on_event: impl FnMut(TrainEvent),
) -> Result<f32> {
    let count = data.labels.len();
    if count == 0 || data.images.dim(0)? != count {
        return Err(Error::InvalidArgument(
            "training needs images, one label each".into(),
        ));
    }
    if options.steps == 0 {
        return Err(Error::setting(Setting::TrainingSteps, "must be at least 1"));
    }
    if options.batch_size == 0 {
        return Err(Error::setting(Setting::BatchSize, "must be at least 1"));
    }
    if let Some(&bad) = data.labels.iter().find(|&&l| l >= data.class_prompts.len()) {
        return Err(Error::InvalidArgument(format!(
            "an image has class {bad} but prompts describe only {} classes",
            data.class_prompts.len()
        )));
    }
    // All prompts in one table, plus a final all-zero row: the "no prompt" conditioning.
    let mut first_row = Vec::with_capacity(data.class_prompts.len());
    let mut table = Vec::new();
    let mut rows = 0usize;
    for prompts in data.class_prompts {
        let n = prompts.dim(0)?;
        if n == 0 {
            return Err(Error::InvalidArgument(
                "every class needs at least one training prompt".into(),
            ));
        }
        first_row.push((rows, n));
        rows += n;
        table.push(prompts.clone());
    }
    table.push(table[0].narrow(0, 0, 1)?.zeros_like()?);
    let table = Tensor::cat(&table, 0)?;
    let null_row = rows as u32;

    let alphas = schedule.alphas_cumprod();
    let device = data.images.device().clone();
    let named: Vec<(String, Var)> = {
        let map = varmap
            .data()
            .lock()
            .map_err(|_| Error::InvalidArgument("variable map poisoned".into()))?;
        let mut v: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let mut ema: Vec<Tensor> = named
        .iter()
        .map(|(_, v)| Ok(v.as_tensor().copy()?))
        .collect::<Result<_>>()?;
    let mut optimizer = AdamW::new(
        named.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: options.learning_rate,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;

    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut order: Vec<usize> = (0..count).collect();
    let mut cursor = count;
    let mut recent = std::collections::VecDeque::with_capacity(100);
    let (h, w) = (data.images.dim(1)?, data.images.dim(2)?);
    let b = options.batch_size;
    for step in 0..options.steps {
        let mut batch = Vec::with_capacity(b);
        while batch.len() < b {
            if cursor == count {
                order.shuffle(&mut rng);
                cursor = 0;
            }
            batch.push(order[cursor]);
            cursor += 1;
        }
        let index: Vec<u32> = batch.iter().map(|&i| i as u32).collect();
        let x0 = from_pixels(
            &data
                .images
                .index_select(&Tensor::from_vec(index, b, &device)?, 0)?,
        )?;
        let timesteps: Vec<usize> = (0..b)
            .map(|_| rng.random_range(0..schedule.train_steps))
            .collect();
        let context_rows: Vec<u32> = batch
            .iter()
            .map(|&i| match rng.random::<f64>() < options.prompt_dropout {
                true => null_row,
                false => {
                    let (first, n) = first_row[data.labels[i]];
                    (first + rng.random_range(0..n)) as u32
                }
            })
            .collect();
        let context = table.index_select(&Tensor::from_vec(context_rows, b, &device)?, 0)?;
        let noise = Tensor::from_vec(normal_values(&mut rng, b * h * w), (b, h, w, 1), &device)?;
        let scale = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = timesteps.iter().map(|&t| f(alphas[t]) as f32).collect();
            Ok(Tensor::from_vec(v, (b, 1, 1, 1), &device)?)
        };
        let x_t = (x0.broadcast_mul(&scale(&|a| a.sqrt())?)?
            + noise.broadcast_mul(&scale(&|a| (1.0 - a).sqrt())?)?)?;
        let predicted = unet.forward(&x_t, &timesteps, &context)?;
        let loss = (predicted - &noise)?.sqr()?.mean_all()?;
        optimizer.set_learning_rate(learning_rate(options, step));
        optimizer.backward_step(&loss)?;
        // Warm-up of the average as in common EMA implementations: early weights fade fast.
        let decay = options
            .ema_decay
            .min((1 + step) as f64 / (10 + step) as f64);
        for (avg, (_, var)) in ema.iter_mut().zip(&named) {
            *avg = ((&*avg * decay)? + (var.as_tensor() * (1.0 - decay))?)?;
        }
        let loss = loss.to_scalar::<f32>()?;
        if !loss.is_finite() {
            return Err(Error::setting(
                Setting::LearningRate,
                format!("is too high: the loss became {loss} at step {step}; lower it"),
            ));
        }
        if recent.len() == 100 {
            recent.pop_front();
        }
        recent.push_back(loss);
        on_event(TrainEvent::Step {
            step: step + 1,
            total: options.steps,
            loss,
        });
    }
    for (avg, (_, var)) in ema.iter().zip(&named) {
        var.set(avg)?;
    }
    Ok(recent.iter().sum::<f32>() / recent.len().max(1) as f32)
}

/// Linear warm-up over the first 2% of steps, then cosine decay to a tenth.
fn learning_rate(options: &DiffusionTraining, step: usize) -> f64 {
    let warmup = (options.steps / 50).max(1);
    if step < warmup {
        return options.learning_rate * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (options.steps - warmup).max(1) as f64;
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    options.learning_rate * (0.1 + 0.9 * cosine)
}
