//! Property tests of the response parsers: no input makes them panic, and every
//! well-formed token response (JSON or XML, numbers as numbers or strings) reads back to
//! the same tokens and the same absolute expiry.

use proptest::prelude::*;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;
use tokenkeeper::provider::{parse_error_response, parse_token_response};
use tokenkeeper::{ExpiryFields, ProviderProfile, absolute_expiry};
use url::Url;

const SENT_AT: OffsetDateTime = datetime!(2026-03-01 12:00 UTC);

fn profiles() -> Vec<ProviderProfile> {
    vec![
        ProviderProfile::generic(Url::parse("https://example.com/token").unwrap()),
        ProviderProfile::lucid(),
        ProviderProfile::highq(Url::parse("https://example.com/inst/").unwrap()),
        ProviderProfile::autodesk(),
    ]
}

const CONTENT_TYPES: [Option<&str>; 5] = [
    None,
    Some("application/json"),
    Some("application/xml; charset=utf-8"),
    Some("text/html"),
    Some("text/plain"),
];

/// Bytes that look like the documents the parsers meet, broken in every way.
fn document_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        "[<>/a-z_&;#x0-9 \"=?!\\[\\]{}:,.-]{0,200}".prop_map(String::into_bytes),
        "<[a-zA-Z_]{1,12}>(<[a-z_]{1,14}>[^<]{0,20}</[a-z_]{1,14}>){0,6}(</[a-zA-Z_]{1,12}>)?"
            .prop_map(String::into_bytes),
        "\\{(\"[a-z_]{1,14}\":(\"[^\"]{0,12}\"|-?[0-9]{1,22}(\\.[0-9]{1,3})?|\\[\\]|null|true|\\{\\}),?){0,6}\\}?"
            .prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(body in document_like()) {
        for profile in profiles() {
            for content_type in CONTENT_TYPES {
                let _ = parse_token_response(&profile, content_type, &body);
            }
        }
        for content_type in CONTENT_TYPES {
            let _ = parse_error_response(content_type, &body);
        }
    }
}

/// A token response as a provider might send it.
#[derive(Clone, Debug)]
struct Response {
    access_token: String,
    refresh_token: Option<String>,
    expires_in: Option<i64>,
    /// Lucid's absolute expiry, in milliseconds after `SENT_AT`.
    expires_after_ms: Option<i64>,
    numbers_as_strings: bool,
    xml: bool,
}

impl Response {
    fn expires_ms(&self) -> Option<i64> {
        let sent_ms = i64::try_from(SENT_AT.unix_timestamp_nanos() / 1_000_000).unwrap();
        self.expires_after_ms.map(|after| sent_ms + after)
    }

    fn body(&self) -> Vec<u8> {
        let number = |n: i64| {
            if self.numbers_as_strings {
                json!(n.to_string())
            } else {
                json!(n)
            }
        };
        let mut fields: Vec<(&str, Value)> = vec![
            ("access_token", json!(self.access_token)),
            ("token_type", json!("bearer")),
        ];
        if let Some(r) = &self.refresh_token {
            fields.push(("refresh_token", json!(r)));
        }
        if let Some(s) = self.expires_in {
            fields.push(("expires_in", number(s)));
        }
        if let Some(ms) = self.expires_ms() {
            fields.push(("expires", number(ms)));
        }
        if self.xml {
            let mut xml = String::from("<?xml version=\"1.0\"?>\n<TokenResponse>");
            for (name, value) in fields {
                let text = match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                xml.push_str(&format!("\n  <{name}>{}</{name}>", escape(&text)));
            }
            xml.push_str("\n</TokenResponse>");
            xml.into_bytes()
        } else {
            let map: serde_json::Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            Value::Object(map).to_string().into_bytes()
        }
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn response() -> impl Strategy<Value = Response> {
    (
        // Token characters, including the ones XML must escape.
        "[A-Za-z0-9._~+/=&<>'-]{1,64}",
        proptest::option::of("[A-Za-z0-9._~+/=&<>'-]{1,64}"),
        proptest::option::of(1i64..100_000_000),
        proptest::option::of(1i64..10_000_000_000),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(access_token, refresh_token, expires_in, expires_after_ms, strings, xml)| Response {
                access_token,
                refresh_token,
                expires_in,
                expires_after_ms,
                numbers_as_strings: strings,
                xml,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn well_formed_responses_round_trip_to_the_same_expiry(response in response()) {
        let body = response.body();
        // The content type is sometimes right, sometimes missing, sometimes lying.
        for content_type in [None, Some("application/json"), Some("application/xml"), Some("text/html")] {
            let parsed = parse_token_response(&ProviderProfile::lucid(), content_type, &body)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
            prop_assert_eq!(parsed.access_token.secret(), response.access_token.as_str());
            prop_assert_eq!(
                parsed.refresh_token.as_ref().map(|r| r.secret().to_owned()),
                response.refresh_token.clone()
            );
            let expected = ExpiryFields {
                expires_in: response.expires_in,
                expires_at_ms: response.expires_ms(),
            };
            prop_assert_eq!(parsed.expiry, expected);
            prop_assert_eq!(
                absolute_expiry(parsed.expiry, SENT_AT, None),
                absolute_expiry(expected, SENT_AT, None)
            );
            if let (Some(s), None) = (response.expires_in, response.expires_after_ms) {
                prop_assert_eq!(
                    absolute_expiry(parsed.expiry, SENT_AT, None),
                    Some(SENT_AT + time::Duration::seconds(s))
                );
            }
        }
    }

    #[test]
    fn highq_profile_reads_the_same_responses(response in response()) {
        let body = response.body();
        let profile = ProviderProfile::highq(Url::parse("https://example.com/inst/").unwrap());
        let parsed = parse_token_response(&profile, Some("application/json"), &body).unwrap();
        prop_assert_eq!(parsed.access_token.secret(), response.access_token.as_str());
        prop_assert_eq!(parsed.expiry.expires_in, response.expires_in);
    }

    #[test]
    fn error_bodies_round_trip(code in "[a-z_]{1,30}", description in "[ -~]{0,80}", xml in any::<bool>()) {
        let body = if xml {
            format!("<ErrorResponse><error>{}</error><error_description>{}</error_description></ErrorResponse>",
                escape(&code), escape(&description))
        } else {
            json!({"error": code, "error_description": description}).to_string()
        };
        let parsed = parse_error_response(None, body.as_bytes()).unwrap();
        prop_assert_eq!(parsed.code, code);
        let trimmed = description.trim();
        prop_assert_eq!(parsed.description.as_deref(), (!trimmed.is_empty()).then_some(trimmed));
    }
}
