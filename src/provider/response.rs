//! Reading token and error responses: JSON or flat XML, numbers or strings, every
//! plausible shape. Pure functions over bytes: property-tested and fuzzed.

use serde_json::{Map, Value};

use super::{EpochUnit, ProviderProfile, ResponseFormat};
use crate::error::ProviderError;
use crate::secret::{AccessToken, RefreshToken};
use crate::token::ExpiryFields;

/// A successful token response, read according to a profile.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TokenResponse {
    /// The new access token.
    pub access_token: AccessToken,
    /// The new refresh token, if the provider sent one (if not, the old one is kept).
    pub refresh_token: Option<RefreshToken>,
    /// The token type as sent.
    pub token_type: Option<String>,
    /// The expiry fields, still relative to the send instant.
    pub expiry: ExpiryFields,
    /// The refresh token's own lifetime in seconds, when sent.
    pub refresh_expires_in: Option<i64>,
    /// The granted scopes, from a `scope` string or a `scopes` array.
    pub scopes: Option<Vec<String>>,
    /// Every other field (secrets such as `id_token` excluded).
    pub extra: Map<String, Value>,
}

/// Why a body is not a token response. Never contains the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError(pub String);

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

/// Fields never copied into [`TokenResponse::extra`]: they are credentials.
const SECRET_FIELDS: &[&str] = &["id_token", "client_secret", "password"];

/// Reads a token response body as `profile` says. Never panics, whatever the bytes.
pub fn parse_token_response(
    profile: &ProviderProfile,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<TokenResponse, ParseError> {
    let mut fields = parse_fields(profile.response_format, content_type, body)?;
    let access_token = match fields.remove("access_token") {
        Some(Value::String(s)) if !s.is_empty() => AccessToken::new(s),
        Some(_) => return Err(ParseError("access_token is not a non-empty string".into())),
        None => return Err(ParseError("no access_token in the response".into())),
    };
    let refresh_token = match fields.remove("refresh_token") {
        Some(Value::String(s)) if !s.is_empty() => Some(RefreshToken::new(s)),
        None | Some(Value::Null) => None,
        Some(Value::String(_)) => None,
        // A number is still a token: never drop a rotated refresh token over its type.
        Some(Value::Number(n)) => Some(RefreshToken::new(n.to_string())),
        Some(_) => return Err(ParseError("refresh_token is not a string".into())),
    };
    let token_type = match fields.remove("token_type") {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    // The tokens are what matters: the provider has already rotated the grant, so a
    // malformed expiry or scope field is logged and read as absent, never a reason to
    // throw the new refresh token away.
    let expires_in = lenient(take_integer(&mut fields, &profile.expires_in_field));
    let expires_at_ms = match &profile.expires_at_field {
        Some((name, unit)) => lenient(take_integer(&mut fields, name)).map(|v| to_millis(v, *unit)),
        None => None,
    };
    let refresh_expires_in = match &profile.refresh_expires_in_field {
        Some(name) => lenient(take_integer(&mut fields, name)),
        None => None,
    };
    let scopes = lenient(take_scopes(&mut fields));
    for secret in SECRET_FIELDS {
        fields.remove(*secret);
    }
    Ok(TokenResponse {
        access_token,
        refresh_token,
        token_type,
        expiry: ExpiryFields {
            expires_in,
            expires_at_ms,
        },
        refresh_expires_in,
        scopes,
        extra: fields,
    })
}

/// Reads an error body: RFC 6749 `{"error","error_description"}`, Autodesk's
/// `{"developerMessage","userMessage","errorCode"}`, or either as flat XML. `None` when the
/// body names no error. Codes are cut to 64 characters, descriptions to 200.
pub fn parse_error_response(content_type: Option<&str>, body: &[u8]) -> Option<ProviderError> {
    parse_error_untruncated(content_type, body).map(truncate_error)
}

/// Cuts an error's code to 64 characters and its description to 200.
pub(crate) fn truncate_error(error: ProviderError) -> ProviderError {
    ProviderError {
        code: truncate(error.code, 64),
        description: error.description.map(|d| truncate(d, 200)),
    }
}

/// [`parse_error_response`] without the cut: secrets are scrubbed from the whole text
/// first (a token cut at the boundary would survive a scrub after the cut).
pub(crate) fn parse_error_untruncated(
    content_type: Option<&str>,
    body: &[u8],
) -> Option<ProviderError> {
    let fields = parse_fields(ResponseFormat::ByContentType, content_type, body).ok()?;
    let text = |name: &str| match fields.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let code = text("error").or_else(|| text("errorCode"))?;
    let description = text("error_description")
        .or_else(|| text("developerMessage"))
        .or_else(|| text("userMessage"))
        .or_else(|| text("message"));
    Some(ProviderError { code, description })
}

/// A malformed optional field reads as absent, with a warning naming the field only.
fn lenient<T>(result: Result<Option<T>, ParseError>) -> Option<T> {
    result.unwrap_or_else(|e| {
        tracing::warn!(problem = %e.0, "ignoring a malformed field of the token response");
        None
    })
}

fn truncate(mut s: String, max_chars: usize) -> String {
    if let Some((at, _)) = s.char_indices().nth(max_chars) {
        s.truncate(at);
        s.push('…');
    }
    s
}

fn parse_fields(
    format: ResponseFormat,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Map<String, Value>, ParseError> {
    // A UTF-8 byte order mark is not part of the document.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let first = body.iter().copied().find(|b| !b.is_ascii_whitespace());
    let declared = content_type.map(|c| c.to_ascii_lowercase());
    let as_xml = match format {
        ResponseFormat::Json => false,
        #[cfg(feature = "xml")]
        ResponseFormat::Xml => true,
        ResponseFormat::ByContentType => match first {
            // The body's first character outranks a header that lies.
            Some(b'{') => false,
            Some(b'<') => true,
            _ => declared.as_deref().is_some_and(|c| c.contains("xml")),
        },
    };
    if as_xml {
        #[cfg(feature = "xml")]
        return parse_xml(body);
        #[cfg(not(feature = "xml"))]
        return Err(ParseError(
            "the body is XML, which this build does not read (tokenkeeper's `xml` feature does)"
                .into(),
        ));
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(ParseError("the JSON body is not an object".into())),
            Err(e) => Err(ParseError(format!(
                "the body is not JSON ({})",
                crate::json_error_summary(&e)
            ))),
        }
    }
}

/// A flat XML document: the root's child elements become string fields.
#[cfg(feature = "xml")]
///
/// quick-xml 0.38 reports entity and character references (`&amp;`, `&#38;`) as separate
/// [`Event::GeneralRef`](quick_xml::events::Event::GeneralRef) events between text events:
/// they are resolved here, and the text is trimmed only once the element is complete, so
/// that `a &amp; b` reads `a & b`.
fn parse_xml(body: &[u8]) -> Result<Map<String, Value>, ParseError> {
    use quick_xml::events::Event;

    let mut reader = quick_xml::Reader::from_reader(body);
    reader.config_mut().trim_text(false);
    let mut fields = Map::new();
    let mut depth = 0usize;
    let mut current: Option<(String, String)> = None;
    let mut buf = Vec::new();
    loop {
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| ParseError(format!("the body is not XML ({})", xml_error_kind(&e))))?;
        match event {
            Event::Start(start) => {
                depth += 1;
                if depth == 2 {
                    let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
                    current = Some((name, String::new()));
                }
            }
            Event::Empty(empty) if depth == 1 => {
                let name = String::from_utf8_lossy(empty.local_name().as_ref()).into_owned();
                fields.insert(name, Value::String(String::new()));
            }
            Event::Text(text) if depth == 2 => {
                if let Some((_, value)) = current.as_mut() {
                    let text = text
                        .decode()
                        .map_err(|_| ParseError("the XML text is not UTF-8".into()))?;
                    value.push_str(&text);
                }
            }
            Event::GeneralRef(reference) if depth == 2 => {
                if let Some((_, value)) = current.as_mut() {
                    let bad = || ParseError("the XML text has a bad entity reference".into());
                    match reference.resolve_char_ref().map_err(|_| bad())? {
                        Some(c) => value.push(c),
                        None => {
                            let name = reference.decode().map_err(|_| bad())?;
                            let resolved = quick_xml::escape::resolve_predefined_entity(&name)
                                .ok_or_else(bad)?;
                            value.push_str(resolved);
                        }
                    }
                }
            }
            Event::CData(data) if depth == 2 => {
                if let Some((_, value)) = current.as_mut() {
                    value.push_str(&String::from_utf8_lossy(&data));
                }
            }
            Event::End(_) => {
                if depth == 2
                    && let Some((name, value)) = current.take()
                {
                    fields.insert(name, Value::String(value.trim().to_owned()));
                }
                depth = depth.saturating_sub(1);
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if depth != 0 {
        return Err(ParseError("the XML body is truncated".into()));
    }
    if fields.is_empty() {
        return Err(ParseError("the XML body has no fields".into()));
    }
    Ok(fields)
}

#[cfg(feature = "xml")]
fn xml_error_kind(e: &quick_xml::Error) -> &'static str {
    match e {
        quick_xml::Error::Io(_) => "read error",
        quick_xml::Error::Syntax(_) => "syntax error",
        quick_xml::Error::IllFormed(_) => "ill-formed",
        quick_xml::Error::Encoding(_) => "bad encoding",
        _ => "invalid",
    }
}

/// An integer field sent as a number or a numeric string (`"3600"`, `3600.0`).
fn take_integer(fields: &mut Map<String, Value>, name: &str) -> Result<Option<i64>, ParseError> {
    let bad = || ParseError(format!("{name} is not a number"));
    match fields.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(bad),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => {
            let s = s.trim();
            s.parse::<i64>()
                .ok()
                .or_else(|| {
                    s.parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite())
                        .map(|f| f as i64)
                })
                .map(Some)
                .ok_or_else(bad)
        }
        Some(_) => Err(bad()),
    }
}

fn to_millis(value: i64, unit: EpochUnit) -> i64 {
    match unit {
        EpochUnit::Milliseconds => value,
        EpochUnit::Seconds => value.saturating_mul(1000),
        EpochUnit::Auto if value > 100_000_000_000 => value,
        EpochUnit::Auto => value.saturating_mul(1000),
    }
}

/// `scope` as a space-separated string (or array), `scopes` as an array (or string).
fn take_scopes(fields: &mut Map<String, Value>) -> Result<Option<Vec<String>>, ParseError> {
    let mut found = None;
    for name in ["scope", "scopes"] {
        match fields.remove(name) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => {
                found = Some(s.split_whitespace().map(str::to_owned).collect());
            }
            Some(Value::Array(items)) => {
                let mut scopes = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) => scopes.push(s),
                        _ => return Err(ParseError(format!("{name} holds a non-string"))),
                    }
                }
                found = Some(scopes);
            }
            Some(_) => return Err(ParseError(format!("{name} is neither a string nor a list"))),
        }
    }
    Ok(found)
}
