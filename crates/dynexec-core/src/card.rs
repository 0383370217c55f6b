//! The JSON cards saved next to the weights dynexec trains (exit heads, adapters, denoisers,
//! step predictors): read with an error that says what the file should have been, written
//! pretty-printed with a final newline.

use crate::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// Parses the JSON file at `path`; one that does not parse is an invalid model, "not `what`".
pub fn read_card<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::InvalidModel {
        path: path.to_path_buf(),
        message: format!("not {what}: {e}"),
    })
}

/// Writes `card` to `path` as pretty JSON ending in a newline.
pub fn write_card(path: &Path, card: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(card)
        .map_err(|e| Error::InvalidArgument(format!("cannot serialise the card: {e}")))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// The running command line as a user would retype it (shell-quoted), with the data cache
/// written as `$DYNEXEC_CACHE`: what a card records to say how to reproduce its weights.
pub fn reproduce_command() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .map(|a| {
            let a = with_cache_variable(&a);
            let plain = a
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./,:=$".contains(c));
            if plain {
                a
            } else {
                format!("\"{}\"", a.replace('\\', "\\\\").replace('"', "\\\""))
            }
        })
        .collect();
    format!("dynexec {}", args.join(" "))
}

/// `text` with the data cache's path written as `$DYNEXEC_CACHE`, so cards do not record
/// this machine's home directory.
pub fn with_cache_variable(text: &str) -> String {
    let cache = crate::files::default_cache_dir()
        .to_string_lossy()
        .into_owned();
    text.replace(&cache, "$DYNEXEC_CACHE")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cards_round_trip_and_bad_ones_say_what_they_should_be() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("card.json");
        write_card(&path, &serde_json::json!({"layers": 3})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with("}\n") && text.contains("\n  \"layers\": 3"),
            "{text}"
        );
        let back: serde_json::Value = read_card(&path, "a test card").unwrap();
        assert_eq!(back["layers"], 3);
        std::fs::write(&path, "{oops").unwrap();
        let err = read_card::<serde_json::Value>(&path, "a test card").unwrap_err();
        assert!(err.to_string().contains("not a test card"), "{err}");
        assert!(read_card::<serde_json::Value>(&dir.path().join("none"), "x").is_err());
    }
}
