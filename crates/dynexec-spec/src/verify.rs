//! Verification of drafted tokens against the target's distributions.

use dynexec_core::sampling::Sampler;

/// Outcome of one verification: how many drafts were accepted and the token that follows
/// them (the target's correction, or a bonus token when every draft passed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Drafts accepted, a prefix of the proposal.
    pub accepted: usize,
    /// The token after the accepted drafts, from the target's distribution.
    pub next: u32,
}

/// Greedy: accept drafts while they equal the target's argmax at their position.
/// `target_argmax` has one more entry than `drafts` (the position after the last draft).
pub fn verify_greedy(drafts: &[u32], target_argmax: &[u32]) -> Verdict {
    let accepted = drafts
        .iter()
        .zip(target_argmax)
        .take_while(|(d, t)| d == t)
        .count();
    Verdict {
        accepted,
        next: target_argmax[accepted],
    }
}

/// Rejection sampling. `target[i]` is the target's distribution at draft position `i`
/// (`drafts.len() + 1` rows); `draft[i]` the draft's, or `None` for a deterministic draft
/// (a one-hot distribution, e.g. prompt lookup).
pub fn verify_sampling(
    drafts: &[u32],
    target: &[Vec<f32>],
    draft: &[Option<Vec<f32>>],
    sampler: &mut Sampler,
) -> Verdict {
    for (i, &d) in drafts.iter().enumerate() {
        let p = &target[i];
        let q_d = draft[i].as_ref().map_or(1.0, |q| q[d as usize]);
        let p_d = p[d as usize];
        if q_d > 0.0 && sampler.uniform() < (p_d / q_d).min(1.0) {
            continue;
        }
        // Rejected: draw from the part of p the draft under-covers, normalize(max(0, p − q)).
        let mut residual: Vec<f32> = match &draft[i] {
            Some(q) => p.iter().zip(q).map(|(p, q)| (p - q).max(0.0)).collect(),
            None => {
                let mut r = p.clone();
                r[d as usize] = 0.0;
                r
            }
        };
        let total: f32 = residual.iter().sum();
        if total <= 0.0 {
            // p == q up to rounding: the rejection had probability ~0; p itself is the answer.
            residual.clone_from(p);
        } else {
            residual.iter_mut().for_each(|r| *r /= total);
        }
        return Verdict {
            accepted: i,
            next: sampler.draw_from(&residual),
        };
    }
    Verdict {
        accepted: drafts.len(),
        next: sampler.draw_from(&target[drafts.len()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynexec_core::sampling::SamplingParams;

    fn sampler(seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature: 1.0,
            seed,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn greedy_accepts_the_agreeing_prefix() {
        assert_eq!(
            verify_greedy(&[5, 6, 7], &[5, 6, 9, 1]),
            Verdict {
                accepted: 2,
                next: 9
            }
        );
        assert_eq!(
            verify_greedy(&[5, 6], &[5, 6, 3]),
            Verdict {
                accepted: 2,
                next: 3
            }
        );
        assert_eq!(
            verify_greedy(&[], &[4]),
            Verdict {
                accepted: 0,
                next: 4
            }
        );
    }

    /// Empirical distribution of the first emitted token when a draft from `q` is verified
    /// against `p` with `step` (a correct or a deliberately wrong rule).
    fn first_token_histogram(
        p: &[f32],
        q: &[f32],
        draws: usize,
        step: impl Fn(u32, &mut Sampler) -> u32,
    ) -> Vec<f64> {
        let mut s = sampler(42);
        let mut counts = vec![0usize; p.len()];
        for _ in 0..draws {
            let d = s.draw_from(q);
            counts[step(d, &mut s) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    fn total_variation(a: &[f64], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - *b as f64).abs())
            .sum::<f64>()
            / 2.0
    }

    #[test]
    fn rejection_sampling_draws_from_the_target_and_a_wrong_rule_is_caught() {
        let p = [0.05f32, 0.40, 0.10, 0.30, 0.15];
        let q = [0.30f32, 0.10, 0.40, 0.10, 0.10];
        let draws = 40_000;
        // With 40k draws the sampling error of the TV distance is about 0.005.
        let bound = 0.015;
        let target = vec![p.to_vec(), p.to_vec()];
        let correct = first_token_histogram(&p, &q, draws, |d, s| {
            let v = verify_sampling(&[d], &target, &[Some(q.to_vec())], s);
            if v.accepted == 1 {
                d
            } else {
                v.next
            }
        });
        let tv = total_variation(&correct, &p);
        assert!(
            tv < bound,
            "speculative sampling is off the target by TV {tv}"
        );

        // Negative control: accepting every draft reproduces q, not p.
        let naive = first_token_histogram(&p, &q, draws, |d, _| d);
        assert!(total_variation(&naive, &p) > 10.0 * bound);
        // Negative control: the right acceptance test but resampling from p instead of the
        // residual max(0, p − q) double-counts what the draft already covers.
        let wrong_residual = first_token_histogram(&p, &q, draws, |d, s| {
            let accept = s.uniform() < (p[d as usize] / q[d as usize]).min(1.0);
            if accept {
                d
            } else {
                s.draw_from(&p)
            }
        });
        let tv_wrong = total_variation(&wrong_residual, &p);
        assert!(
            tv_wrong > 3.0 * bound,
            "the wrong residual went unnoticed (TV {tv_wrong})"
        );
    }

    #[test]
    fn deterministic_drafts_are_verified_against_one_hot_proposals() {
        let p = [0.2f32, 0.5, 0.3];
        let target = vec![p.to_vec(), p.to_vec()];
        let hist = first_token_histogram(&p, &[0.0, 0.0, 1.0], 40_000, |d, s| {
            let v = verify_sampling(&[d], &target, &[None], s);
            if v.accepted == 1 {
                d
            } else {
                v.next
            }
        });
        assert!(total_variation(&hist, &p) < 0.015, "{hist:?}");
    }
}
