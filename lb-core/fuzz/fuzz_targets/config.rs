//! Fuzzes lb-proxy's config parser (`lb_proxy::config::parse`) with arbitrary
//! UTF-8 text, as an operator's file or a reload could hand it over.
//!
//! Properties checked on every input:
//! - `parse` never panics, whatever the text;
//! - an error names the file it was given, says what is wrong (a non-empty
//!   message), names no field on a comment line, and a position it names lies
//!   inside the text (line within the text's lines, column at least 1), so an
//!   operator can find what to fix;
//! - an error renders as a message without panicking;
//! - parsing is deterministic: the same text gives the same answer twice.

#![no_main]

use lb_proxy::config::{parse, ConfigError};
use libfuzzer_sys::fuzz_target;

const ORIGIN: &str = "fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(ORIGIN, text) {
        Ok(config) => assert!(parse(ORIGIN, text).is_ok_and(|again| again == config)),
        Err(e) => {
            check_located(&e, text);
            assert_eq!(parse(ORIGIN, text).err(), Some(e));
        }
    }
});

fn check_located(e: &ConfigError, text: &str) {
    assert_eq!(e.file, ORIGIN);
    assert!(!e.message.is_empty(), "{e:?}");
    if e.line > 0 {
        // A span at the very end of the text sits one past its last line.
        let lines = text.split('\n').count();
        assert!(e.line <= lines, "line {} of {lines}: {e:?}", e.line);
        assert!(e.column >= 1, "{e:?}");
        let line = text.lines().nth(e.line - 1).unwrap_or("");
        if line.trim_start().starts_with('#') {
            assert_eq!(e.field, "", "a comment is not a field: {e:?}");
        }
    }
    let shown = e.to_string();
    assert!(shown.starts_with(ORIGIN), "{shown}");
}
