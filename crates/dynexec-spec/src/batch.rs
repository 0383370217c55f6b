//! Speculative sequences stepped together, as the server steps them: sequences whose
//! drafters run the same draft model draft in one forward per drafted position.

use crate::drafter::Draft;
use crate::engine::SpeculativeSequence;
use dynexec_core::stats::secs;
use dynexec_core::{Error, Result};
use dynexec_models::kv_cache::KvCache;
use std::time::Instant;

/// [`SpeculativeSequence::draft`] for several sequences at once: sequences whose drafters
/// run the same whole draft model share one draft forward per drafted position (the
/// others draft on their own). Returns each sequence's rows for the target, in order.
pub fn draft_together(
    sequences: &mut [&mut SpeculativeSequence<'_>],
    max_drafts: &[usize],
) -> Vec<Result<Vec<u32>>> {
    let mut feeds: Vec<Option<Result<Vec<u32>>>> = (0..sequences.len()).map(|_| None).collect();
    let mut budgets = vec![0; sequences.len()];
    // The sequences drafting together: those whose drafter is the first batchable one's
    // model (drafters of one server share it; the name tells models apart).
    let mut shared_model: Option<String> = None;
    let mut together = Vec::new();
    for (i, seq) in sequences.iter_mut().enumerate() {
        let k = seq.draft_budget(max_drafts.get(i).copied().unwrap_or(0));
        budgets[i] = k;
        let name = seq.drafter.as_batchable().map(|d| d.parts().2.to_string());
        match name {
            Some(name) if k > 0 && shared_model.as_ref().is_none_or(|m| *m == name) => {
                shared_model = Some(name);
                together.push(i);
            }
            _ => feeds[i] = Some(seq.draft(k)),
        }
    }
    if together.len() < 2 {
        // Nothing to share: draft as usual.
        for &i in &together {
            feeds[i] = Some(sequences[i].draft(budgets[i]));
        }
    } else {
        let drafted = draft_rounds(sequences, &together, &budgets);
        match drafted {
            Ok(drafts) => {
                for (i, draft) in drafts {
                    feeds[i] = Some(Ok(sequences[i].hold_draft(draft)));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for &i in &together {
                    feeds[i] = Some(Err(Error::InvalidArgument(format!(
                        "batched drafting failed: {message}"
                    ))));
                }
            }
        }
    }
    feeds
        .into_iter()
        .map(|f| {
            f.unwrap_or_else(|| Err(Error::InvalidArgument("a sequence was not drafted".into())))
        })
        .collect()
}

/// The drafting rounds of [`draft_together`]: round one feeds each sequence what its draft
/// cache lacks, later rounds each continuing sequence's last draft token, all in one
/// forward of the shared draft model per round.
fn draft_rounds(
    sequences: &mut [&mut SpeculativeSequence<'_>],
    together: &[usize],
    budgets: &[usize],
) -> Result<Vec<(usize, Draft)>> {
    let start = Instant::now();
    let mut drafts: Vec<(usize, Draft)> = together.iter().map(|&i| (i, Draft::default())).collect();
    // (index into `drafts`, the rows it feeds this round)
    let mut feeding: Vec<(usize, Vec<u32>)> = Vec::with_capacity(together.len());
    for (slot, &i) in together.iter().enumerate() {
        let seq = &mut *sequences[i];
        let drafter = seq
            .drafter
            .as_batchable()
            .ok_or_else(|| Error::InvalidArgument("a shared draft lost its model".into()))?;
        feeding.push((slot, drafter.catch_up(&seq.tokens)?.to_vec()));
    }
    let first = together[0];
    let model = match sequences[first].drafter.as_batchable() {
        Some(d) => d.parts().0.clone(),
        None => {
            return Err(Error::InvalidArgument(
                "a shared draft lost its model".into(),
            ))
        }
    };
    while !feeding.is_empty() {
        let rows: Vec<&[u32]> = feeding.iter().map(|(_, r)| r.as_slice()).collect();
        let hidden = {
            let mut members: Vec<&mut SpeculativeSequence<'_>> = Vec::with_capacity(feeding.len());
            let wanted: Vec<usize> = feeding.iter().map(|(slot, _)| together[*slot]).collect();
            for (i, seq) in sequences.iter_mut().enumerate() {
                if wanted.contains(&i) {
                    members.push(&mut **seq);
                }
            }
            let mut caches: Vec<&mut KvCache> = Vec::with_capacity(members.len());
            for member in members.iter_mut() {
                let drafter = member.drafter.as_batchable().ok_or_else(|| {
                    Error::InvalidArgument("a shared draft lost its model".into())
                })?;
                drafter.count_forward();
                caches.push(drafter.parts().1);
            }
            model.hidden_segments(&rows, &mut caches)?
        };
        let mut next = Vec::with_capacity(feeding.len());
        let mut row_end = 0;
        for (slot, fed) in &feeding {
            row_end += fed.len();
            let i = together[*slot];
            let seq = &mut *sequences[i];
            let last = hidden.narrow(1, row_end - 1, 1)?;
            let sampler = if seq.greedy {
                None
            } else {
                Some(&mut seq.sampler)
            };
            let drafter = seq
                .drafter
                .as_batchable()
                .ok_or_else(|| Error::InvalidArgument("a shared draft lost its model".into()))?;
            let logits = drafter.head_logits(&last)?;
            let draft = &mut drafts[*slot].1;
            let (token, signal, distribution) =
                drafter.choose(&logits, draft.tokens.len() + 1, sampler)?;
            draft.tokens.push(token);
            draft.signals.push(signal);
            draft.distributions.push(distribution);
            if draft.tokens.len() < budgets[i] && seq.lookahead.keep_drafting(&signal) {
                next.push((*slot, vec![token]));
            }
        }
        feeding = next;
    }
    // The shared time, split evenly.
    let share = secs(start.elapsed()) / together.len() as f64;
    for &i in together {
        sequences[i].spec.draft_secs += share;
    }
    Ok(drafts)
}
