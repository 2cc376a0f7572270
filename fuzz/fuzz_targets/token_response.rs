//! `parse_token_response` with every provider profile: never panics, and never keeps an
//! empty access token.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tokenkeeper::ProviderProfile;
use tokenkeeper::provider::parse_token_response;
use url::Url;

static PROFILES: LazyLock<Vec<ProviderProfile>> = LazyLock::new(|| {
    vec![
        ProviderProfile::generic(Url::parse("https://auth.example.com/token").unwrap()),
        ProviderProfile::lucid(),
        ProviderProfile::highq(Url::parse("https://highq.example.com/collaborate/").unwrap()),
        ProviderProfile::autodesk(),
    ]
});

const CONTENT_TYPES: [Option<&str>; 5] = [
    None,
    Some("application/json"),
    Some("application/xml"),
    Some("text/html"),
    Some("application/json; charset=utf-8"),
];

fuzz_target!(|data: &[u8]| {
    // The first byte picks the Content-Type; the rest is the body.
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    for profile in PROFILES.iter() {
        if let Ok(response) = parse_token_response(profile, content_type, body) {
            assert!(!response.access_token.secret().is_empty());
        }
    }
});
