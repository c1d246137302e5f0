//! Errors as one line of text, for logs, Events and conditions.

use std::error::Error;

/// Longest [`error_chain`], in bytes: it goes into Events and conditions.
pub const MAX_ERROR_CHAIN: usize = 1000;

/// The error followed by its sources, joined by `": "`, on one line of at most
/// [`MAX_ERROR_CHAIN`] bytes. A source whose text the message already holds is not repeated.
pub fn error_chain(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        // Some errors print their source in their own message; say it once.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    let end = crate::truncate_bytes(&text, MAX_ERROR_CHAIN).len();
    text.truncate(end);
    text
}

/// Only the sources of an error, joined by `": "` (empty when it has none): for a log line
/// that records the error's own message in a field beside it.
pub fn error_sources(err: &dyn Error) -> String {
    let mut text = String::new();
    let mut source = err.source();
    while let Some(cause) = source {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use super::*;

    #[derive(Debug)]
    struct Failure {
        message: String,
        source: Option<Box<Failure>>,
    }

    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.message)
        }
    }

    impl Error for Failure {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.source.as_deref().map(|s| s as &(dyn Error + 'static))
        }
    }

    fn chain(messages: &[&str]) -> Failure {
        let mut error: Option<Failure> = None;
        for message in messages.iter().rev() {
            error = Some(Failure {
                message: (*message).to_owned(),
                source: error.map(Box::new),
            });
        }
        error.expect("at least one message")
    }

    #[test]
    fn the_chain_names_every_cause_once() {
        let err = chain(&["failed to apply", "connection refused", "os error 111"]);
        assert_eq!(
            error_chain(&err),
            "failed to apply: connection refused: os error 111"
        );
        let echoing = chain(&["failed to read: disk gone", "disk gone"]);
        assert_eq!(error_chain(&echoing), "failed to read: disk gone");
        assert_eq!(error_chain(&chain(&["alone"])), "alone");
    }

    #[test]
    fn the_chain_is_bounded_on_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_CHAIN);
        let text = error_chain(&chain(&[&long]));
        assert!(text.len() <= MAX_ERROR_CHAIN);
        assert!(text.len() >= MAX_ERROR_CHAIN - 1);
        assert!(text.chars().all(|c| c == 'é'));
    }

    #[test]
    fn the_sources_leave_out_the_error_itself() {
        let err = chain(&["failed to poll", "timed out", "deadline"]);
        assert_eq!(error_sources(&err), "timed out: deadline");
        assert_eq!(error_sources(&chain(&["alone"])), "");
    }
}
