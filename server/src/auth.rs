//! Access control: JWT (HS256) document tokens, the admin key, and the origin allow-list.
//!
//! The application's backend mints tokens with the shared secret; collab checks them at the
//! WebSocket upgrade, before any document is loaded, and closes a connection when its token
//! expires. Nothing here logs a token or a secret.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// How far a token's `nbf` may be in the future and still be accepted (clock skew between the
/// minting backend and this server).
pub const NBF_SKEW: Duration = Duration::from_secs(30);

/// Secrets shorter than this are accepted but warned about: HS256 keys should carry at least
/// as many bits as the hash.
pub const RECOMMENDED_SECRET_LEN: usize = 32;

/// A secret from the command line, the environment or a file. Its `Debug` never shows it, so
/// printing the configuration cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// Reads a secret from a file, trimmed (files usually end with a newline).
    pub fn from_file(path: &Path) -> std::io::Result<Secret> {
        Ok(Secret(std::fs::read_to_string(path)?.trim().to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison, so response timing says nothing about how much of a guess
    /// was right.
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Perm {
    #[serde(rename = "read-write")]
    ReadWrite,
    #[serde(rename = "read-only")]
    ReadOnly,
}

impl FromStr for Perm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read-write" => Ok(Perm::ReadWrite),
            "read-only" => Ok(Perm::ReadOnly),
            other => Err(format!(
                "perm must be \"read-write\" or \"read-only\", not {other:?}"
            )),
        }
    }
}

/// The claims of a document token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// An exact document name, or a prefix ending in `*`.
    pub doc: String,
    pub perm: Perm,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

impl Claims {
    /// Whether the `doc` claim covers the document named `name` (the raw URL path).
    pub fn covers(&self, name: &str) -> bool {
        match self.doc.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => self.doc == name,
        }
    }
}

/// What a connection may do, decided once at the upgrade.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub read_only: bool,
    /// When the token stops being valid; the connection is closed (4401) then.
    pub expires_at: Option<SystemTime>,
    /// The token's user id, for logs and spans only.
    pub sub: Option<String>,
}

/// Why a request is refused. Each maps to an HTTP status: 401 for credentials that are
/// missing or not valid, 403 for valid credentials that do not cover the request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error(
        "a token is required (the `token` query parameter or an Authorization: Bearer header)"
    )]
    Missing,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token's algorithm is not HS256")]
    WrongAlgorithm,
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token does not grant access to this document")]
    WrongDocument,
}

impl AuthError {
    pub fn status(&self) -> u16 {
        match self {
            AuthError::WrongDocument => 403,
            _ => 401,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MintError {
    #[error("the server has no auth secret, so it does not use tokens")]
    NoSecret,
    #[error("doc must be 1 to {max} bytes")]
    BadDoc { max: usize },
    #[error("ttl must be between 1 second and {max_secs} seconds")]
    BadTtl { max_secs: u64 },
}

/// A freshly minted token.
#[derive(Debug, Serialize)]
pub struct Minted {
    pub token: String,
    /// Seconds since the epoch.
    pub expires_at: u64,
}

/// Longest lifetime of a minted token: a year. Longer-lived credentials belong in the
/// application's backend, not in a token handed to a browser.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

struct Keys {
    decoding: DecodingKey,
    encoding: EncodingKey,
}

/// The server's access policy.
pub struct Auth {
    keys: Option<Keys>,
    allow_anonymous_read: bool,
    validation: Validation,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.keys.is_some())
            .field("allow_anonymous_read", &self.allow_anonymous_read)
            .finish()
    }
}

fn now_secs(now: SystemTime) -> f64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Auth {
    /// `secret: None` is open mode: everyone may read and write every document.
    pub fn new(secret: Option<&Secret>, allow_anonymous_read: bool) -> Auth {
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` and `nbf` are checked here with exact and skewed bounds; the library applies one
        // leeway to both and accepts a token in its expiry second.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.required_spec_claims = ["exp".to_owned()].into_iter().collect();
        Auth {
            keys: secret.map(|s| Keys {
                decoding: DecodingKey::from_secret(s.expose().as_bytes()),
                encoding: EncodingKey::from_secret(s.expose().as_bytes()),
            }),
            allow_anonymous_read,
            validation,
        }
    }

    /// Whether tokens are checked at all.
    pub fn enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// Decides what a client presenting `token` may do with the document `doc`.
    pub fn authorize(
        &self,
        token: Option<&str>,
        doc: &str,
        now: SystemTime,
    ) -> Result<Access, AuthError> {
        let Some(keys) = &self.keys else {
            return Ok(Access::default());
        };
        let Some(token) = token else {
            return if self.allow_anonymous_read {
                Ok(Access {
                    read_only: true,
                    ..Access::default()
                })
            } else {
                Err(AuthError::Missing)
            };
        };
        let claims = self.verify(keys, token, now)?;
        if !claims.covers(doc) {
            return Err(AuthError::WrongDocument);
        }
        Ok(Access {
            read_only: claims.perm == Perm::ReadOnly,
            expires_at: Some(UNIX_EPOCH + Duration::from_secs(claims.exp)),
            sub: claims.sub,
        })
    }

    fn verify(&self, keys: &Keys, token: &str, now: SystemTime) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &keys.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::WrongAlgorithm
                }
                ErrorKind::MissingRequiredClaim(c) => {
                    AuthError::Malformed(format!("the {c} claim is required"))
                }
                ErrorKind::Json(_) => AuthError::Malformed(
                    "the header or claims are not what collab expects (doc, perm, exp)".into(),
                ),
                _ => AuthError::Malformed("not a JWT".into()),
            })?;
        let claims = data.claims;
        let now = now_secs(now);
        if now >= claims.exp as f64 {
            return Err(AuthError::Expired);
        }
        if let Some(nbf) = claims.nbf {
            if now + NBF_SKEW.as_secs_f64() < nbf as f64 {
                return Err(AuthError::NotYetValid);
            }
        }
        Ok(claims)
    }

    /// Signs a token for `doc` valid for `ttl` from `now`.
    pub fn mint(
        &self,
        doc: &str,
        perm: Perm,
        ttl: Duration,
        sub: Option<String>,
        now: SystemTime,
    ) -> Result<Minted, MintError> {
        let keys = self.keys.as_ref().ok_or(MintError::NoSecret)?;
        let max = crate::config::MAX_DOC_NAME_LEN;
        if doc.is_empty() || doc.len() > max {
            return Err(MintError::BadDoc { max });
        }
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(MintError::BadTtl {
                max_secs: MAX_TTL.as_secs(),
            });
        }
        let exp = (now_secs(now) as u64) + ttl.as_secs().max(1);
        let claims = Claims {
            doc: doc.to_owned(),
            perm,
            exp,
            sub,
            nbf: None,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.encoding)
            // Encoding claims of strings and integers with an HMAC key cannot fail.
            .expect("HS256 token encodes");
        Ok(Minted {
            token,
            expires_at: exp,
        })
    }
}

/// The token a request presents: the `token` query parameter (what `WebsocketProvider`'s
/// `params` sends) or an `Authorization: Bearer` header (server-side clients).
pub fn presented_token<'a>(query: &'a str, authorization: Option<&'a str>) -> Option<String> {
    let from_query = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    from_query.or_else(|| bearer(authorization).map(str::to_owned))
}

/// The credential of an `Authorization: Bearer <credential>` header.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let value = authorization?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// The origin allow-list against Cross-Site WebSocket Hijacking: exact origins
/// (`https://app.example.com`) and subdomain patterns (`https://*.example.com`).
#[derive(Debug, Clone, Default)]
pub struct Origins {
    /// Empty: every origin is allowed.
    patterns: Vec<String>,
}

impl Origins {
    pub fn new(patterns: &[String]) -> Origins {
        Origins {
            patterns: patterns
                .iter()
                .map(|p| p.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|p| !p.is_empty())
                .collect(),
        }
    }

    pub fn is_restricted(&self) -> bool {
        !self.patterns.is_empty()
    }

    /// Whether a request with this `Origin` header may connect. Requests without the header
    /// come from non-browser clients, which cross-site hijacking cannot use.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        if self.patterns.is_empty() {
            return true;
        }
        let origin = origin.trim().to_ascii_lowercase();
        self.patterns.iter().any(|p| pattern_matches(p, &origin))
    }
}

fn pattern_matches(pattern: &str, origin: &str) -> bool {
    let Some((scheme, host)) = pattern.split_once("://*.") else {
        return pattern == origin;
    };
    let Some(rest) = origin
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix("://"))
    else {
        return false;
    };
    let Some(sub) = rest.strip_suffix(host).and_then(|s| s.strip_suffix('.')) else {
        return false;
    };
    // The wildcard stands for one or more DNS labels, nothing else (no port, no userinfo).
    !sub.is_empty()
        && sub
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !sub.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-test-secret-that-is-long-enough-000";

    fn auth() -> Auth {
        Auth::new(Some(&Secret::new(SECRET)), false)
    }

    fn token(claims: serde_json::Value, alg: Algorithm, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn exact_and_prefix_documents() {
        let t = token(
            serde_json::json!({"doc": "team-42/*", "perm": "read-only", "exp": 2000, "sub": "u1"}),
            Algorithm::HS256,
            SECRET,
        );
        let a = auth()
            .authorize(Some(&t), "team-42/notes", at(1000))
            .unwrap();
        assert!(a.read_only);
        assert_eq!(a.sub.as_deref(), Some("u1"));
        assert_eq!(a.expires_at, Some(at(2000)));
        assert_eq!(
            auth()
                .authorize(Some(&t), "team-43/notes", at(1000))
                .unwrap_err(),
            AuthError::WrongDocument
        );
        let exact = token(
            serde_json::json!({"doc": "a", "perm": "read-write", "exp": 2000}),
            Algorithm::HS256,
            SECRET,
        );
        assert!(
            !auth()
                .authorize(Some(&exact), "a", at(1000))
                .unwrap()
                .read_only
        );
        assert_eq!(
            auth().authorize(Some(&exact), "ab", at(1000)).unwrap_err(),
            AuthError::WrongDocument
        );
    }

    #[test]
    fn expiry_is_exact_and_nbf_has_skew() {
        let t = token(
            serde_json::json!({"doc": "a", "perm": "read-write", "exp": 2000, "nbf": 1500}),
            Algorithm::HS256,
            SECRET,
        );
        assert!(auth().authorize(Some(&t), "a", at(1999)).is_ok());
        assert_eq!(
            auth().authorize(Some(&t), "a", at(2000)).unwrap_err(),
            AuthError::Expired
        );
        assert!(auth().authorize(Some(&t), "a", at(1470)).is_ok());
        assert_eq!(
            auth().authorize(Some(&t), "a", at(1469)).unwrap_err(),
            AuthError::NotYetValid
        );
    }

    #[test]
    fn refuses_other_algorithms_and_bad_signatures() {
        let claims = serde_json::json!({"doc": "a", "perm": "read-write", "exp": 2000});
        let hs512 = token(claims.clone(), Algorithm::HS512, SECRET);
        assert_eq!(
            auth().authorize(Some(&hs512), "a", at(1000)).unwrap_err(),
            AuthError::WrongAlgorithm
        );
        let other = token(claims.clone(), Algorithm::HS256, "another-secret");
        assert_eq!(
            auth().authorize(Some(&other), "a", at(1000)).unwrap_err(),
            AuthError::BadSignature
        );
        // alg: none, unsigned.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(claims.to_string())
        );
        assert!(auth().authorize(Some(&none), "a", at(1000)).is_err());
        assert_eq!(
            auth().authorize(None, "a", at(1000)).unwrap_err(),
            AuthError::Missing
        );
        assert!(matches!(
            auth().authorize(Some("garbage"), "a", at(1000)),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn anonymous_read_and_open_mode() {
        let a = Auth::new(Some(&Secret::new(SECRET)), true);
        assert!(a.authorize(None, "x", at(1)).unwrap().read_only);
        assert!(a.authorize(Some("garbage"), "x", at(1)).is_err());
        let open = Auth::new(None, false);
        assert!(!open.authorize(None, "x", at(1)).unwrap().read_only);
    }

    #[test]
    fn minted_tokens_verify() {
        let m = auth()
            .mint("d", Perm::ReadOnly, Duration::from_secs(60), None, at(1000))
            .unwrap();
        assert_eq!(m.expires_at, 1060);
        assert!(
            auth()
                .authorize(Some(&m.token), "d", at(1059))
                .unwrap()
                .read_only
        );
        assert_eq!(
            Auth::new(None, false)
                .mint("d", Perm::ReadOnly, Duration::from_secs(1), None, at(0))
                .unwrap_err(),
            MintError::NoSecret
        );
    }

    #[test]
    fn tokens_come_from_the_query_or_a_bearer_header() {
        assert_eq!(
            presented_token("a=1&token=x%2Ey", None).as_deref(),
            Some("x.y")
        );
        assert_eq!(
            presented_token("", Some("Bearer abc")).as_deref(),
            Some("abc")
        );
        assert_eq!(presented_token("", Some("Basic abc")), None);
        assert_eq!(presented_token("", None), None);
    }

    #[test]
    fn origin_patterns() {
        let o = Origins::new(&[
            "https://app.example.com".into(),
            "https://*.example.org".into(),
        ]);
        assert!(o.allows(None));
        assert!(o.allows(Some("https://app.example.com")));
        assert!(!o.allows(Some("http://app.example.com")));
        assert!(!o.allows(Some("https://evil.com")));
        assert!(o.allows(Some("https://a.b.example.org")));
        assert!(!o.allows(Some("https://example.org")));
        assert!(!o.allows(Some("https://evilexample.org")));
        assert!(!o.allows(Some("https://x.example.org.evil.com")));
        assert!(Origins::new(&[]).allows(Some("https://anything")));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(s.matches("hunter2"));
        assert!(!s.matches("hunter"));
    }
}
