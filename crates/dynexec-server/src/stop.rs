//! Stop strings over streamed text: text that might be the start of a stop string is held
//! back until it is known not to be, so a client never sees part of a stop string.

/// Splits growing text into what can be sent now and where a stop string ends it.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
    /// A stop string was found: nothing more is handed out.
    stopped: bool,
}

/// What a new piece of text allows.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Send this (possibly empty) text and go on.
    Continue(String),
    /// A stop string appeared: send this text, then end the generation.
    Stop(String),
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// The text so far, up to a matched stop string once one is found.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Adds the next piece of text; says what may be sent and whether a stop string ended
    /// it. After a stop, every push returns an empty [`StopCheck::Stop`].
    pub fn push(&mut self, piece: &str) -> StopCheck {
        if self.stopped {
            return StopCheck::Stop(String::new());
        }
        // A match may start in text already held back (never in text already sent).
        let search_from = self.sent;
        self.text.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[search_from..].find(s.as_str()))
            .min();
        if let Some(at) = found {
            self.text.truncate(search_from + at);
            self.stopped = true;
            return StopCheck::Stop(self.take_until(self.text.len()));
        }
        let safe = self.text.len() - self.held_back_len();
        StopCheck::Continue(self.take_until(safe))
    }

    /// Everything not yet sent: the generation ended without a stop string.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        self.take_until(self.text.len())
    }

    /// Length of the longest unsent suffix that is a proper prefix of a stop string.
    fn held_back_len(&self) -> usize {
        let unsent = &self.text[self.sent..];
        unsent
            .char_indices()
            .map(|(i, _)| &unsent[i..])
            .find(|suffix| self.stops.iter().any(|s| s.starts_with(suffix)))
            .map_or(0, str::len)
    }

    fn take_until(&mut self, end: usize) -> String {
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut sent = Vec::new();
        for p in pieces {
            match m.push(p) {
                StopCheck::Continue(t) => sent.push(t),
                StopCheck::Stop(t) => {
                    sent.push(t);
                    return (sent, true, m.text().to_string());
                }
            }
        }
        sent.push(m.finish());
        (sent, false, m.text().to_string())
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_sent() {
        let (sent, stopped, text) = run(&["\n\n"], &["Hello", " world\n", "\nmore"]);
        assert!(stopped);
        assert_eq!(sent.concat(), "Hello world");
        assert_eq!(text, "Hello world");
        // The lone newline was held back until the next piece showed what it began.
        assert_eq!(sent, vec!["Hello", " world", ""]);
    }

    #[test]
    fn held_text_is_released_when_it_turns_out_not_to_stop() {
        let (sent, stopped, _) = run(&["END"], &["the E", "ND", "x"]);
        assert!(stopped);
        assert_eq!(sent.concat(), "the ");
        // After a stop, nothing more comes out.
        let mut m = StopMatcher::new(vec!["x".into()]);
        assert_eq!(m.push("axb"), StopCheck::Stop("a".into()));
        assert_eq!(m.push("more"), StopCheck::Stop(String::new()));
        assert_eq!(m.finish(), "");
        let (sent, stopped, _) = run(&["END"], &["the E", "nd of it"]);
        assert!(!stopped);
        assert_eq!(sent, vec!["the ", "End of it", ""]);
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_no_stops_pass_everything() {
        let (sent, stopped, _) = run(&["b", "a"], &["xxab"]);
        assert!(stopped);
        assert_eq!(sent.concat(), "xx");
        let (sent, stopped, _) = run(&[], &["é", "ü"]);
        assert!(!stopped);
        assert_eq!(sent.concat(), "éü");
        // Empty stop strings are ignored rather than stopping at once.
        let (_, stopped, _) = run(&[""], &["abc"]);
        assert!(!stopped);
    }

    #[test]
    fn multibyte_text_is_held_back_on_character_boundaries() {
        let (sent, stopped, _) = run(&["éa"], &["xé", "b"]);
        assert!(!stopped);
        assert_eq!(sent, vec!["x", "éb", ""]);
    }
}
