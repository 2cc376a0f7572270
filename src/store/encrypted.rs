//! [`EncryptedStore`]: any [`TokenStore`] with the tokens encrypted at rest (feature
//! `encryption`).
//!
//! Each secret of a stored set (the access token, the refresh token, and the provider's
//! other response fields, which may name the user) is sealed on its own with
//! XChaCha20-Poly1305 under the current key, as an envelope
//! `tk1.<key id>.<base64url(nonce ‖ ciphertext)>` in the field it replaces. The store key
//! and the field's name are the associated data, so a ciphertext copied to another key,
//! or to another field, fails to open. Everything else (expiries, scopes, the write-ahead
//! record) stays readable, so the wrapped store's `due` index, leases and versions work
//! unchanged: they pass through untouched.
//!
//! Keys rotate: [`EncryptedStore::with_old_key`] adds keys that still open what they
//! sealed; every save seals under the current key, so a grant moves to it at its next
//! rotation. A set that no configured key opens (a missing or wrong key, a tampered
//! ciphertext) is [`StoreError::Undecryptable`] and is left as it is: nothing is written
//! over a set that could not be read.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretBox};
use time::OffsetDateTime;

use super::{Lease, StoreError, TokenStore, Versioned};
use crate::secret::{AccessToken, RefreshToken};
use crate::token::TokenSet;

/// The envelope's prefix (format version 1).
const PREFIX: &str = "tk1";
/// The field of [`TokenSet::extra`] holding the sealed extra fields (always present in
/// a sealed set: its marker).
const SEALED_EXTRA: &str = super::SEALED_MARKER;
/// XChaCha20's nonce length.
const NONCE_LEN: usize = 24;

/// A 256-bit key and its id, held in a zeroizing box (clones share it); `Debug` shows
/// only the id.
#[derive(Clone)]
pub struct EncryptionKey {
    id: String,
    key: Arc<SecretBox<[u8; 32]>>,
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl EncryptionKey {
    /// A key named `id` (1 to 32 characters of `A-Z a-z 0-9 _ -`: it is written beside
    /// each ciphertext, so that the right key opens it after a rotation).
    pub fn new(id: impl Into<String>, key: [u8; 32]) -> Result<Self, StoreError> {
        // This copy of the bytes is wiped once boxed (the caller's is the caller's).
        let mut key = Zeroizing::new(key);
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= 32
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(StoreError::Misconfigured(
                "an encryption key id is 1 to 32 characters of A-Z a-z 0-9 _ -".into(),
            ));
        }
        Ok(Self {
            id,
            key: Arc::new(SecretBox::new(Box::new(std::mem::take(&mut *key)))),
        })
    }

    /// A key given as 32 bytes in base64 (standard or URL-safe, padded or not), as kept in
    /// a secret manager or an environment variable. The error never quotes the value.
    pub fn from_base64(id: impl Into<String>, encoded: &str) -> Result<Self, StoreError> {
        // The standard alphabet in the URL-safe one; every copy wiped when dropped.
        let mut normalized = Zeroizing::new(String::with_capacity(encoded.len()));
        for c in encoded.trim().trim_end_matches('=').chars() {
            normalized.push(match c {
                '+' => '-',
                '/' => '_',
                c => c,
            });
        }
        let bytes =
            Zeroizing::new(URL_SAFE_NO_PAD.decode(normalized.as_bytes()).map_err(|_| {
                StoreError::Misconfigured("the encryption key is not valid base64".into())
            })?);
        let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            StoreError::Misconfigured("an encryption key is 32 bytes (256 bits)".into())
        })?;
        Self::new(id, key)
    }

    /// A new random key (from the operating system's generator).
    pub fn generate(id: impl Into<String>) -> Result<Self, StoreError> {
        let key = XChaCha20Poly1305::generate_key(&mut OsRng);
        Self::new(id, key.into())
    }

    /// The key's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.key.expose_secret().into())
    }
}

/// A [`TokenStore`] whose stored tokens are encrypted (see the [module](self) docs).
/// Cloning it clones the wrapped store and shares the keys.
///
/// ```
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tokenkeeper::store::encrypted::{EncryptedStore, EncryptionKey};
/// use tokenkeeper::FileStore;
///
/// let current = EncryptionKey::from_base64("2026-11", &std::env::var("TOKEN_KEY")?)?;
/// let store = EncryptedStore::new(FileStore::new("grants"), current);
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EncryptedStore<S> {
    inner: S,
    /// The current key first, then older keys that only open.
    keys: Vec<EncryptionKey>,
    plaintext_reads: bool,
}

impl<S: fmt::Debug> fmt::Debug for EncryptedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedStore")
            .field("inner", &self.inner)
            .field(
                "keys",
                &self.keys.iter().map(EncryptionKey::id).collect::<Vec<_>>(),
            )
            .field("plaintext_reads", &self.plaintext_reads)
            .finish()
    }
}

impl<S: TokenStore> EncryptedStore<S> {
    /// Wraps `inner`, sealing under `current`.
    pub fn new(inner: S, current: EncryptionKey) -> Self {
        Self {
            inner,
            keys: vec![current],
            plaintext_reads: false,
        }
    }

    /// Adds a key that opens what it sealed but seals nothing: the previous key, during a
    /// rotation. Its id must differ from the others'.
    pub fn with_old_key(mut self, key: EncryptionKey) -> Result<Self, StoreError> {
        if self.keys.iter().any(|k| k.id == key.id) {
            return Err(StoreError::Misconfigured(format!(
                "two encryption keys have the id {:?}",
                key.id
            )));
        }
        self.keys.push(key);
        Ok(self)
    }

    /// Also reads sets stored in clear (written before encryption was turned on); each is
    /// sealed at its next save. Off by default: an unsealed token found where only sealed
    /// ones belong is refused, since anyone able to write the store could plant it.
    pub fn with_plaintext_reads(mut self) -> Self {
        self.plaintext_reads = true;
        self
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// `set` with its secrets sealed for `key`.
    fn seal(&self, key: &str, set: &TokenSet) -> Result<TokenSet, StoreError> {
        let current = &self.keys[0];
        let mut sealed = set.clone();
        sealed.access_token = set
            .access_token
            .as_ref()
            .map(|t| seal(current, key, "access_token", t.secret()).map(AccessToken::new))
            .transpose()?;
        sealed.refresh_token = set
            .refresh_token
            .as_ref()
            .map(|t| seal(current, key, "refresh_token", t.secret()).map(RefreshToken::new))
            .transpose()?;
        // Always, even with no extra fields: the marker of a sealed set, which every
        // reader without this wrapper refuses rather than take an envelope for a token.
        let json = serde_json::to_string(&set.extra).map_err(|_| {
            StoreError::Misconfigured("the extra fields cannot be serialized".into())
        })?;
        sealed.extra = serde_json::Map::new();
        sealed.extra.insert(
            SEALED_EXTRA.into(),
            serde_json::Value::String(seal(current, key, "extra", &json)?),
        );
        Ok(sealed)
    }

    /// `set` as stored under `key`, opened. A set is sealed whole (its marker, every
    /// token) or, with [`with_plaintext_reads`](Self::with_plaintext_reads), plain whole;
    /// anything in between (a plain token planted beside sealed ones) is refused.
    fn open(&self, key: &str, set: TokenSet) -> Result<TokenSet, StoreError> {
        let mut opened = set;
        let sealed = match opened.extra.get(SEALED_EXTRA) {
            Some(serde_json::Value::String(envelope)) if opened.extra.len() == 1 => {
                let json = self.open_field(key, "extra", envelope)?;
                opened.extra = serde_json::from_str(&json).map_err(|_| undecryptable(key))?;
                true
            }
            Some(_) => return Err(undecryptable(key)),
            None if self.plaintext_reads => false,
            None => return Err(undecryptable(key)),
        };
        if let Some(token) = &opened.access_token {
            let plain = self.open_token(key, "access_token", token.secret(), sealed)?;
            opened.access_token = Some(AccessToken::new(plain));
        }
        if let Some(token) = &opened.refresh_token {
            let plain = self.open_token(key, "refresh_token", token.secret(), sealed)?;
            opened.refresh_token = Some(RefreshToken::new(plain));
        }
        Ok(opened)
    }

    /// A token of a sealed set (which must open), or of a plain one (which must not be
    /// an envelope).
    fn open_token(
        &self,
        key: &str,
        field: &str,
        value: &str,
        sealed: bool,
    ) -> Result<String, StoreError> {
        match (open(&self.keys, key, field, value), sealed) {
            (Opened::Plain(text), true) => Ok(text),
            (Opened::NotSealed, false) => Ok(value.to_owned()),
            _ => Err(undecryptable(key)),
        }
    }

    fn open_field(&self, key: &str, field: &str, value: &str) -> Result<String, StoreError> {
        match open(&self.keys, key, field, value) {
            Opened::Plain(text) => Ok(text),
            Opened::NotSealed | Opened::Failed => Err(undecryptable(key)),
        }
    }
}

fn undecryptable(key: &str) -> StoreError {
    StoreError::Undecryptable {
        key: key.to_owned(),
    }
}

/// The associated data: what the ciphertext belongs to.
fn associated_data(key: &str, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(32 + key.len() + field.len());
    aad.extend_from_slice(b"tokenkeeper/tk1\0");
    aad.extend_from_slice(field.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key.as_bytes());
    aad
}

fn seal(with: &EncryptionKey, key: &str, field: &str, plain: &str) -> Result<String, StoreError> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let aad = associated_data(key, field);
    let sealed = with
        .cipher()
        .encrypt(
            &nonce,
            Payload {
                msg: plain.as_bytes(),
                aad: &aad,
            },
        )
        .map_err(|_| StoreError::Misconfigured("encryption failed".into()))?;
    let mut bytes = Vec::with_capacity(NONCE_LEN + sealed.len());
    bytes.extend_from_slice(&nonce);
    bytes.extend_from_slice(&sealed);
    Ok(format!(
        "{PREFIX}.{}.{}",
        with.id,
        URL_SAFE_NO_PAD.encode(bytes)
    ))
}

enum Opened {
    Plain(String),
    /// Not an envelope at all.
    NotSealed,
    /// An envelope no configured key opens.
    Failed,
}

fn open(keys: &[EncryptionKey], key: &str, field: &str, value: &str) -> Opened {
    let mut parts = value.splitn(3, '.');
    let (Some(PREFIX), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
        return Opened::NotSealed;
    };
    let Some(with) = keys.iter().find(|k| k.id == id) else {
        return Opened::Failed;
    };
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(body) else {
        return Opened::Failed;
    };
    if bytes.len() < NONCE_LEN {
        return Opened::Failed;
    }
    let (nonce, sealed) = bytes.split_at(NONCE_LEN);
    let aad = associated_data(key, field);
    match with.cipher().decrypt(
        XNonce::from_slice(nonce),
        Payload {
            msg: sealed,
            aad: &aad,
        },
    ) {
        Ok(plain) => String::from_utf8(plain).map_or(Opened::Failed, Opened::Plain),
        Err(_) => Opened::Failed,
    }
}

#[async_trait]
impl<S: TokenStore> TokenStore for EncryptedStore<S> {
    async fn load(&self, key: &str) -> Result<Option<Versioned<TokenSet>>, StoreError> {
        match self.inner.load(key).await? {
            None => Ok(None),
            Some(stored) => Ok(Some(Versioned {
                value: self.open(key, stored.value)?,
                version: stored.version,
            })),
        }
    }

    async fn save(
        &self,
        key: &str,
        token: &TokenSet,
        expected: Option<u64>,
        lease: &Lease,
    ) -> Result<u64, StoreError> {
        let sealed = self.seal(key, token)?;
        self.inner.save(key, &sealed, expected, lease).await
    }

    async fn lease(&self, key: &str, ttl: Duration) -> Result<Lease, StoreError> {
        self.inner.lease(key, ttl).await
    }

    async fn renew(&self, key: &str, lease: &Lease, ttl: Duration) -> Result<(), StoreError> {
        self.inner.renew(key, lease, ttl).await
    }

    async fn delete(&self, key: &str, lease: &Lease) -> Result<(), StoreError> {
        self.inner.delete(key, lease).await
    }

    async fn keys(&self) -> Result<Vec<String>, StoreError> {
        self.inner.keys().await
    }

    async fn due(&self, before: OffsetDateTime, limit: usize) -> Result<Vec<String>, StoreError> {
        self.inner.due(before, limit).await
    }

    fn watch(&self) -> Result<crate::store::Watch, StoreError> {
        self.inner.watch()
    }

    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        self.inner.check_key(key)
    }
}
