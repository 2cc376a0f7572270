//! Secret newtypes: [`AccessToken`], [`RefreshToken`] and [`ClientSecret`].
//!
//! Each wraps its value in an `Arc` of a [`secrecy::SecretString`]: cloning is one reference
//! count increment, the bytes are zeroized when the last clone drops, `Debug` prints
//! `Name([redacted])`, there is no `Display`, and the value is reachable only through an
//! explicit `secret()`.

use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

macro_rules! secret_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone)]
        pub struct $name(Arc<SecretString>);

        impl $name {
            /// Wraps a secret value.
            pub fn new(value: impl Into<String>) -> Self {
                Self(Arc::new(SecretString::from(value.into())))
            }

            /// The secret value itself.
            ///
            /// Anything that receives this string can leak it: never log it, put it in an
            /// error message or format it for display.
            pub fn secret(&self) -> &str {
                self.0.expose_secret()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "([redacted])"))
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                Arc::ptr_eq(&self.0, &other.0) || self.secret() == other.secret()
            }
        }

        impl Eq for $name {}

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.secret())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                String::deserialize(deserializer).map(Self::new)
            }
        }
    };
}

secret_type!(
    /// A bearer access token. Cheap to clone (one reference count).
    ///
    /// Serializes to its plain value: that is how stores persist it.
    AccessToken
);
secret_type!(
    /// A refresh token: the long-lived credential that must never be lost or presented twice.
    ///
    /// Serializes to its plain value: that is how stores persist it.
    RefreshToken
);
secret_type!(
    /// An OAuth client secret.
    ClientSecret
);

/// The client's identity at the token endpoint: a client id and, for confidential clients,
/// a secret. `Debug` never shows the secret.
#[derive(Clone, Debug)]
pub struct ClientCredentials {
    id: String,
    secret: Option<ClientSecret>,
}

impl ClientCredentials {
    /// A confidential client: id and secret.
    pub fn new(id: impl Into<String>, secret: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: Some(ClientSecret::new(secret)),
        }
    }

    /// A public client: id only (Autodesk's PKCE clients, for instance).
    pub fn public(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            secret: None,
        }
    }

    /// The client id (not a secret).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The client secret, if this is a confidential client.
    pub fn secret(&self) -> Option<&ClientSecret> {
        self.secret.as_ref()
    }
}
