//! Scoped credentials. One credential has two spellings: a bearer token `<id>.<secret>` for the
//! native API, and an AWS access key pair (access key id = `<id>`, secret = `<secret>`) for the
//! AWS Private CA API. Secrets are never stored: they are HMAC-SHA256(token key, id), the
//! token key lives in the CA directory with mode 0600.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hmac::{Hmac, Mac};
use parking_lot::RwLock;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trellis_core::{NamespaceName, ServiceName};

use crate::error::CaError;
use crate::journal::{self, Journal};
use crate::state::CaState;

/// What a credential may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Scope {
    /// May obtain exactly this one workload identity, nothing else.
    Workload {
        namespace: NamespaceName,
        service: ServiceName,
    },
    /// May obtain any identity in the trust domain and revoke certificates.
    Admin,
}

impl Scope {
    /// Whether this scope may obtain the identity (namespace, service).
    /// The control plane's own identity is never allowed, not even to an admin.
    pub fn allows(&self, namespace: &NamespaceName, service: &ServiceName) -> bool {
        if trellis_core::SpiffeId::is_reserved(namespace, service) {
            return false;
        }
        match self {
            Scope::Admin => true,
            Scope::Workload {
                namespace: n,
                service: s,
            } => n == namespace && s == service,
        }
    }
}

/// One line of `tokens.jsonl` (and one `tokens/` record of a shared [`CaState`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub id: String,
    pub scope: Scope,
    #[serde(with = "time::serde::rfc3339")]
    pub created: time::OffsetDateTime,
    /// Hex SHA-256 of the secret, in shared state only: another replica (whose token key differs)
    /// checks bearer tokens against it. The secret itself is never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sha256: Option<String>,
}

/// What the store knows about one credential.
#[derive(Debug, Clone)]
struct Known {
    scope: Scope,
    created: time::OffsetDateTime,
    /// Set for credentials learned from shared state (created by another replica).
    secret_sha256: Option<[u8; 32]>,
}

/// A newly created credential (the only time its secret is shown).
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    pub secret: String,
    pub scope: Scope,
}

impl NewToken {
    /// The bearer token for `Authorization: Bearer ...`.
    pub fn bearer(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

/// Why a credential was refused (401 vs 403 on the wire).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials")]
    Missing,
    #[error("invalid credentials")]
    Invalid,
    /// The credential exists but the request signature (SigV4) does not verify.
    #[error("the request signature does not match")]
    BadSignature,
    #[error("credential is not allowed to {0}")]
    Forbidden(String),
}

/// The credential store of one CA.
#[derive(Clone)]
pub struct Tokens {
    key: Arc<[u8; 32]>,
    scopes: Arc<ArcSwap<HashMap<String, Known>>>,
    path: Option<PathBuf>,
    shared: Arc<RwLock<Option<Arc<dyn CaState>>>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

pub(crate) const TOKEN_KEY: &str = "token.key";
pub(crate) const TOKENS: &str = "tokens.jsonl";

impl Tokens {
    /// A store that lives only in memory.
    pub fn in_memory() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Self {
            key: Arc::new(key),
            scopes: Arc::new(ArcSwap::from_pointee(HashMap::new())),
            path: None,
            shared: Arc::default(),
        }
    }

    /// Creates the token key in a new CA directory.
    pub(crate) fn init_dir(dir: &Path) -> Result<(), CaError> {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        journal::write_new(&dir.join(TOKEN_KEY), hex::encode(key).as_bytes(), 0o600)
    }

    /// Loads the store of a CA directory.
    pub fn open(dir: &Path) -> Result<Self, CaError> {
        let key_path = dir.join(TOKEN_KEY);
        let text = journal::read_text(&key_path)?;
        let key: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| CaError::corrupt(&key_path, "expected 64 hex characters"))?;
        let path = dir.join(TOKENS);
        let recs: Vec<TokenRecord> = journal::read_all(&path)?;
        let scopes = recs
            .into_iter()
            .map(|r| {
                let known = Known {
                    scope: r.scope,
                    created: r.created,
                    secret_sha256: None,
                };
                (r.id, known)
            })
            .collect();
        Ok(Self {
            key: Arc::new(key),
            scopes: Arc::new(ArcSwap::from_pointee(scopes)),
            path: Some(path),
            shared: Arc::default(),
        })
    }

    /// Creates a credential with `scope` (persisted when the store has a directory).
    pub fn create(&self, scope: Scope) -> Result<NewToken, CaError> {
        let mut raw = [0u8; 10];
        rand::rng().fill_bytes(&mut raw);
        let id = format!("TRL{}", hex::encode_upper(raw));
        let created = time::OffsetDateTime::now_utc();
        let shared = self.shared.read().clone();
        if let Some(state) = shared {
            state.put_token(&self.shared_record(&id, &scope, created))?;
        } else if let Some(path) = &self.path {
            Journal::open(path)?.append(&[TokenRecord {
                id: id.clone(),
                scope: scope.clone(),
                created,
                secret_sha256: None,
            }])?;
        }
        self.insert(
            id.clone(),
            Known {
                scope: scope.clone(),
                created,
                secret_sha256: None,
            },
        );
        Ok(NewToken {
            secret: self.secret_for(&id),
            id,
            scope,
        })
    }

    fn insert(&self, id: String, known: Known) {
        let mut m = HashMap::clone(&self.scopes.load());
        m.insert(id, known);
        self.scopes.store(Arc::new(m));
    }

    fn shared_record(&self, id: &str, scope: &Scope, created: time::OffsetDateTime) -> TokenRecord {
        TokenRecord {
            id: id.to_owned(),
            scope: scope.clone(),
            created,
            secret_sha256: Some(hex::encode(Sha256::digest(self.secret_for(id)))),
        }
    }

    /// Records new credentials in shared state from now on (several replicas of one CA).
    pub fn share_state(&self, state: Arc<dyn CaState>) {
        *self.shared.write() = Some(state);
    }

    /// Every credential this store created or loaded itself, as shared-state records (with the
    /// secret's hash): a replica publishes the tokens of its CA directory with these.
    pub fn own_records(&self) -> Vec<TokenRecord> {
        self.scopes
            .load()
            .iter()
            .filter(|(_, k)| k.secret_sha256.is_none())
            .map(|(id, k)| self.shared_record(id, &k.scope, k.created))
            .collect()
    }

    /// Accepts a credential another replica recorded in shared state. Records without a secret
    /// hash and credentials this store already knows are ignored.
    pub fn learn(&self, record: TokenRecord) {
        let Some(hash) = record
            .secret_sha256
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
        else {
            return;
        };
        if self.scopes.load().contains_key(&record.id) {
            return;
        }
        self.insert(
            record.id,
            Known {
                scope: record.scope,
                created: record.created,
                secret_sha256: Some(hash),
            },
        );
    }

    /// The secret of credential `id` (derived, never stored).
    pub(crate) fn secret_for(&self, id: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key[..])
            .expect("HMAC accepts keys of any length");
        mac.update(id.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..20])
    }

    /// The scope of a known credential id.
    pub fn scope(&self, id: &str) -> Option<Scope> {
        self.scopes.load().get(id).map(|k| k.scope.clone())
    }

    /// Checks a bearer token `<id>.<secret>` and returns its scope.
    pub fn check_bearer(&self, token: &str) -> Result<Scope, AuthError> {
        let (id, secret) = token.split_once('.').ok_or(AuthError::Invalid)?;
        let known = self
            .scopes
            .load()
            .get(id)
            .cloned()
            .ok_or(AuthError::Invalid)?;
        let good = match known.secret_sha256 {
            // Created by another replica: its secret derives from that replica's key.
            Some(hash) => ct_eq(&hash, &Sha256::digest(secret.as_bytes())),
            None => ct_eq(self.secret_for(id).as_bytes(), secret.as_bytes()),
        };
        if !good {
            return Err(AuthError::Invalid);
        }
        Ok(known.scope)
    }

    /// Parses `Authorization: Bearer <token>` and checks it.
    pub fn check_header(&self, value: Option<&http::HeaderValue>) -> Result<Scope, AuthError> {
        let v = value.ok_or(AuthError::Missing)?;
        let v = v.to_str().map_err(|_| AuthError::Invalid)?;
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .ok_or(AuthError::Invalid)?;
        self.check_bearer(token.trim())
    }
}

/// Constant-time equality (length is not secret).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_scope_obtains_the_control_plane_identity() {
        let ns: NamespaceName = trellis_core::CONTROL_PLANE_NAMESPACE.parse().unwrap();
        let svc: ServiceName = trellis_core::CONTROL_PLANE_SERVICE.parse().unwrap();
        assert!(!Scope::Admin.allows(&ns, &svc));
        let exact = Scope::Workload {
            namespace: ns.clone(),
            service: svc.clone(),
        };
        assert!(!exact.allows(&ns, &svc));
        // Other services of that namespace stay ordinary names.
        let other: ServiceName = "api".parse().unwrap();
        assert!(Scope::Admin.allows(&ns, &other));
    }

    #[test]
    fn scoped_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        Tokens::init_dir(dir.path()).unwrap();
        let t = Tokens::open(dir.path()).unwrap();
        let ns: NamespaceName = "my-app".parse().unwrap();
        let a: ServiceName = "a".parse().unwrap();
        let b: ServiceName = "b".parse().unwrap();
        let tok = t
            .create(Scope::Workload {
                namespace: ns.clone(),
                service: a.clone(),
            })
            .unwrap();
        let scope = t.check_bearer(&tok.bearer()).unwrap();
        assert!(scope.allows(&ns, &a));
        assert!(!scope.allows(&ns, &b));
        let reopened = Tokens::open(dir.path()).unwrap();
        assert_eq!(reopened.check_bearer(&tok.bearer()).unwrap(), scope);
        assert_eq!(
            reopened.check_bearer(&format!("{}.{}", tok.id, "0".repeat(40))),
            Err(AuthError::Invalid)
        );
        assert_eq!(reopened.check_bearer("nope"), Err(AuthError::Invalid));
    }
}
