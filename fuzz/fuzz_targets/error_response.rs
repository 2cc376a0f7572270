//! `parse_error_response`: never panics, and a parsed error always has a non-empty code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenkeeper::provider::parse_error_response;

const CONTENT_TYPES: [Option<&str>; 4] = [
    None,
    Some("application/json"),
    Some("application/xml"),
    Some("text/plain"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    if let Some(error) = parse_error_response(content_type, body) {
        assert!(!error.code.is_empty());
    }
});
