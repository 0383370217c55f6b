//! Token frequencies for FR-Spec (Zhao et al. 2025, "FR-Spec: Accelerating Large-Vocabulary
//! Language Models via Frequency-Ranked Speculative Sampling"): a draft model whose LM head
//! covers only the N most frequent tokens of a corpus drafts much faster when the vocabulary
//! is large (Qwen2.5's 152k-row head is a third of the 0.5B's decoding step), and the target
//! still verifies against the full vocabulary, so the output does not change.
//!
//! A [`TokenRanking`] is counted by dynexec (`dynexec spec rank-tokens`) with one tokenizer,
//! and refuses to serve another.

use dynexec_core::tokenizer::TextTokenizer;
use dynexec_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Token ids by descending frequency in a corpus, for one tokenizer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRanking {
    /// [`tokenizer_fingerprint`] of the tokenizer that counted.
    pub tokenizer: String,
    /// What was counted, as the user described it.
    pub corpus: String,
    /// The command that reproduces it (empty where none was recorded).
    #[serde(default)]
    pub command: String,
    /// Tokens counted in all.
    pub counted_tokens: u64,
    /// The share of the counted tokens that the top N ids cover, for N = 1024, 2048, ...
    pub coverage: Vec<(usize, f64)>,
    /// Every id seen at least once, most frequent first (ties: lower id first).
    pub ranking: Vec<u32>,
}

/// A stable name for a tokenizer's vocabulary: FNV-1a over every id's token string. Two
/// tokenizers with the same fingerprint spell every id the same way.
pub fn tokenizer_fingerprint(tokenizer: &TextTokenizer) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for id in 0..tokenizer.vocab_size() as u32 {
        let token = tokenizer.id_to_token(id).unwrap_or_default();
        for byte in token.bytes().chain([0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{}-fnv1a-{hash:016x}", tokenizer.vocab_size())
}

impl TokenRanking {
    /// Counts the tokens of `texts` with `tokenizer`.
    pub fn count<'a>(
        tokenizer: &TextTokenizer,
        corpus: &str,
        texts: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self> {
        let mut counts = vec![0u64; tokenizer.vocab_size()];
        let mut counted = 0u64;
        for text in texts {
            for id in tokenizer.encode(text)? {
                if let Some(c) = counts.get_mut(id as usize) {
                    *c += 1;
                    counted += 1;
                }
            }
        }
        let mut ranking: Vec<u32> = (0..counts.len() as u32)
            .filter(|&id| counts[id as usize] > 0)
            .collect();
        ranking.sort_by_key(|&id| (std::cmp::Reverse(counts[id as usize]), id));
        let mut coverage = Vec::new();
        let mut n = 1024;
        while n < ranking.len() {
            let covered: u64 = ranking[..n].iter().map(|&id| counts[id as usize]).sum();
            coverage.push((n, covered as f64 / counted.max(1) as f64));
            n *= 2;
        }
        Ok(Self {
            tokenizer: tokenizer_fingerprint(tokenizer),
            corpus: corpus.to_string(),
            command: String::new(),
            counted_tokens: counted,
            coverage,
            ranking,
        })
    }

    /// Reads a ranking written by [`Self::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::InvalidArgument(format!(
                "{} is not a token ranking ({e}); make one with `dynexec spec rank-tokens`",
                path.display()
            ))
        })
    }

    /// Writes the ranking as JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string(self)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode the ranking: {e}")))?;
        std::fs::write(path, json).map_err(|e| Error::file(path, e))
    }

    /// The `n` most frequent ids plus the tokenizer's end-of-sequence ids (a draft that can
    /// never end would be rejected at every end of text), in ascending id order. Refuses a
    /// ranking counted with another tokenizer.
    pub fn subset(&self, n: usize, tokenizer: &TextTokenizer) -> Result<Vec<u32>> {
        let fingerprint = tokenizer_fingerprint(tokenizer);
        if fingerprint != self.tokenizer {
            return Err(Error::InvalidArgument(format!(
                "the token ranking was counted with tokenizer {} but the draft's is {fingerprint}: count one for this model with `dynexec spec rank-tokens`",
                self.tokenizer
            )));
        }
        if n == 0 {
            return Err(Error::InvalidArgument(
                "a draft vocabulary needs at least one token".to_string(),
            ));
        }
        let mut ids: Vec<u32> = self.ranking.iter().take(n).copied().collect();
        ids.extend((0..tokenizer.vocab_size() as u32).filter(|&id| tokenizer.is_eos(id)));
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }
}

/// The manifest name of the ranking `--draft-vocab N` uses when it names none: counted on
/// Python source with Qwen2.5's tokenizer (every Qwen2.5 and Qwen2.5-Coder size shares it).
pub const DEFAULT_RANKING: &str = "qwen2.5-token-ranking";

/// The file a ranking model folder holds.
pub const RANKING_FILE: &str = "ranking.json";

/// A draft vocabulary as a user names it: `N[:RANKING]`, the N most frequent tokens of a
/// ranking (a manifest name or a file; [`DEFAULT_RANKING`] when omitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftVocabSpec {
    /// How many of the most frequent tokens the draft may propose.
    pub size: usize,
    /// The ranking's manifest name or path.
    pub ranking: String,
}

impl std::str::FromStr for DraftVocabSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let (size, ranking) = spec
            .split_once(':')
            .map_or((spec, DEFAULT_RANKING), |(n, r)| (n, r));
        match size.parse::<usize>() {
            Ok(size) if size > 0 && !ranking.is_empty() => Ok(Self {
                size,
                ranking: ranking.to_string(),
            }),
            _ => Err(Error::BadSpec {
                setting: dynexec_core::Setting::DraftVocab,
                spec: spec.to_string(),
                help: "use N[:RANKING]: the N > 0 most frequent tokens of a ranking (a file or manifest name from `dynexec spec rank-tokens`), e.g. 32768".to_string(),
            }),
        }
    }
}

impl std::fmt::Display for DraftVocabSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.size, self.ranking)
    }
}

/// A ranking read and the number of its tokens a draft may propose.
#[derive(Debug, Clone)]
pub struct DraftVocab {
    /// How many of the most frequent tokens.
    pub size: usize,
    /// The ranking they come from.
    pub ranking: TokenRanking,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_vocab_specs_parse_or_explain() {
        let spec: DraftVocabSpec = "32768".parse().unwrap();
        assert_eq!(spec.ranking, DEFAULT_RANKING);
        assert_eq!(spec.size, 32768);
        let spec: DraftVocabSpec = "100:my/ranking.json".parse().unwrap();
        assert_eq!((spec.size, spec.ranking.as_str()), (100, "my/ranking.json"));
        for bad in ["0", "x", "-3", "5:"] {
            let err = bad.parse::<DraftVocabSpec>().unwrap_err().to_string();
            assert!(err.contains("N[:RANKING]"), "{bad}: {err}");
        }
    }
}
