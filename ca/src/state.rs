//! Where the CA's durable state goes: issued serials, revocations, scoped tokens and the audit
//! log. By default the JSON-lines journals of the CA directory ([`JournalState`]); a host that
//! runs several replicas of one CA service plugs in a shared implementation (the control plane's
//! etcd one) with [`crate::Authority::share_state`] and [`crate::Tokens::share_state`], and feeds
//! the other replicas' records back with [`crate::Authority::learn`] and [`crate::Tokens::learn`].

use std::path::PathBuf;

use crate::authority::{AuditRecord, IndexRecord};
use crate::commit::GroupCommit;
use crate::error::CaError;
use crate::journal::{self, Journal};
use crate::token::TokenRecord;

/// Durable CA state. Every method returns only once the record is durable (fsynced, or committed
/// by a quorum); the calls come from blocking threads (never from an async worker).
pub trait CaState: Send + Sync + 'static {
    /// Records an issuance or a revocation together with its audit record. An issuance whose
    /// serial is already recorded fails with [`CaError::SerialTaken`] (serials are create-only,
    /// so a collision across replicas is detected); revoking twice fails with
    /// [`CaError::AlreadyRevoked`].
    fn record(&self, record: &IndexRecord, audit: &AuditRecord) -> Result<(), CaError>;
    /// Records a new scoped credential (never its secret).
    fn put_token(&self, token: &TokenRecord) -> Result<(), CaError>;
    /// The whole audit log, oldest first.
    fn audit_log(&self) -> Result<Vec<AuditRecord>, CaError>;
}

/// The default state: `audit.jsonl`, `index.jsonl` and `tokens.jsonl` in the CA directory,
/// issuances group-committed.
pub(crate) struct JournalState {
    dir: PathBuf,
    commit: GroupCommit,
}

impl JournalState {
    pub(crate) fn open(dir: PathBuf) -> Result<Self, CaError> {
        Ok(Self {
            commit: GroupCommit::new(
                Journal::open(&dir.join(crate::ca_dir::AUDIT))?,
                Journal::open(&dir.join(crate::ca_dir::INDEX))?,
            ),
            dir,
        })
    }
}

impl CaState for JournalState {
    fn record(&self, record: &IndexRecord, audit: &AuditRecord) -> Result<(), CaError> {
        self.commit.append(audit, record)
    }
    fn put_token(&self, token: &TokenRecord) -> Result<(), CaError> {
        Journal::open(&self.dir.join(crate::token::TOKENS))?.append(std::slice::from_ref(token))
    }
    fn audit_log(&self) -> Result<Vec<AuditRecord>, CaError> {
        journal::read_all(&self.dir.join(crate::ca_dir::AUDIT))
    }
}

/// An in-memory CA keeps nothing.
pub(crate) struct NoState;

impl CaState for NoState {
    fn record(&self, _: &IndexRecord, _: &AuditRecord) -> Result<(), CaError> {
        Ok(())
    }
    fn put_token(&self, _: &TokenRecord) -> Result<(), CaError> {
        Ok(())
    }
    fn audit_log(&self) -> Result<Vec<AuditRecord>, CaError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::*;
    use crate::authority::RevokeReason;
    use crate::csr::VerifiedCsr;
    use crate::renewer::generate_key_and_csr;
    use crate::token::{Scope, Tokens};
    use crate::{Authority, Policy, Serial};

    /// Shared state in memory, as etcd would hold it: create-only keys, an ordered log of what was
    /// written (fed to the other replica by hand, as a watch would).
    #[derive(Default)]
    struct Shared {
        keys: Mutex<BTreeMap<String, ()>>,
        log: Mutex<Vec<IndexRecord>>,
        tokens: Mutex<Vec<TokenRecord>>,
        audit: Mutex<Vec<AuditRecord>>,
        /// Refuse the next N issuances as collisions.
        collide: Mutex<u32>,
    }

    impl CaState for Shared {
        fn record(&self, record: &IndexRecord, audit: &AuditRecord) -> Result<(), CaError> {
            let key = match record {
                IndexRecord::Issued { serial, .. } => {
                    let mut c = self.collide.lock();
                    if *c > 0 {
                        *c -= 1;
                        return Err(CaError::SerialTaken(serial.clone()));
                    }
                    format!("issued/{serial}")
                }
                IndexRecord::Revoked { serial, .. } => format!("revoked/{serial}"),
            };
            if self.keys.lock().insert(key, ()).is_some() {
                return Err(match record {
                    IndexRecord::Issued { serial, .. } => CaError::SerialTaken(serial.clone()),
                    IndexRecord::Revoked { serial, .. } => CaError::AlreadyRevoked(serial.clone()),
                });
            }
            self.log.lock().push(record.clone());
            self.audit.lock().push(audit.clone());
            Ok(())
        }
        fn put_token(&self, token: &TokenRecord) -> Result<(), CaError> {
            self.tokens.lock().push(token.clone());
            Ok(())
        }
        fn audit_log(&self) -> Result<Vec<AuditRecord>, CaError> {
            Ok(self.audit.lock().clone())
        }
    }

    fn replica(shared: &Arc<Shared>) -> Authority {
        let a = Authority::in_memory("mesh.local".parse().unwrap(), Policy::default()).unwrap();
        a.share_state(shared.clone());
        a
    }

    fn issue(a: &Authority) -> Serial {
        let (_, csr) = generate_key_and_csr().unwrap();
        let id = "spiffe://mesh.local/ns/n/svc/s".parse().unwrap();
        a.issue(
            &VerifiedCsr::parse(csr.as_bytes()).unwrap(),
            &id,
            None,
            false,
            "t",
        )
        .unwrap()
        .serial
    }

    fn audit_events(a: &Authority) -> Vec<String> {
        a.audit_log()
            .unwrap()
            .into_iter()
            .map(|r| r.event)
            .collect()
    }

    fn crl_serials(a: &Authority) -> Vec<Serial> {
        let pem = pem::parse(a.crl_pem().as_bytes()).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(pem.contents()).unwrap();
        crl.iter_revoked_certificates()
            .map(|r| Serial::from_be_bytes(r.raw_serial()).unwrap())
            .collect()
    }

    #[test]
    fn replicas_share_serials_revocations_and_the_audit_log() {
        let shared = Arc::new(Shared::default());
        let (a, b) = (replica(&shared), replica(&shared));
        let s = issue(&a);
        // B learns A's certificate (a watch would feed it), echoes are ignored.
        let log = shared.log.lock().clone();
        b.learn(log.clone()).unwrap();
        a.learn(log).unwrap();
        assert!(b.certificate(&s).is_some());
        // Revoked through B: recorded once, not in B's CRL (not B's certificate)...
        b.revoke(&s, RevokeReason::KeyCompromise, "admin").unwrap();
        assert!(crl_serials(&b).is_empty());
        // ...and in A's once A learns it.
        assert!(crl_serials(&a).is_empty());
        let revoked = shared.log.lock().last().cloned().unwrap();
        a.learn([revoked.clone()]).unwrap();
        assert_eq!(crl_serials(&a), [s]);
        a.learn([revoked]).unwrap();
        // A second revocation anywhere is refused by the shared state.
        assert!(matches!(
            a.revoke(&s, RevokeReason::Superseded, "admin"),
            Err(CaError::AlreadyRevoked(_))
        ));
        let events = audit_events(&a);
        assert_eq!(events, ["issue", "revoke:keyCompromise"]);
    }

    #[test]
    fn the_default_state_is_the_journals() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::CaDir::new(dir.path().join("ca"));
        let a = ca
            .init("mesh.local".parse().unwrap(), Policy::default())
            .unwrap();
        let s = issue(&a);
        a.revoke(&s, RevokeReason::Superseded, "admin").unwrap();
        let events = audit_events(&a);
        assert_eq!(events, ["issue", "revoke:superseded"]);
        // What the journals hold is what a reopened CA knows.
        let reopened = ca.open().unwrap();
        assert_eq!(reopened.revoked(), [s]);
        assert_eq!(reopened.audit_log().unwrap().len(), 2);
    }

    #[test]
    fn a_serial_taken_by_another_replica_is_drawn_again() {
        let shared = Arc::new(Shared::default());
        let a = replica(&shared);
        *shared.collide.lock() = 2;
        let s = issue(&a);
        assert_eq!(a.issued_count(), 1);
        assert!(a.certificate(&s).is_some());
        *shared.collide.lock() = 10;
        let (_, csr) = generate_key_and_csr().unwrap();
        let id = "spiffe://mesh.local/ns/n/svc/s".parse().unwrap();
        let r = a.issue(
            &VerifiedCsr::parse(csr.as_bytes()).unwrap(),
            &id,
            None,
            false,
            "t",
        );
        assert!(matches!(r, Err(CaError::SerialTaken(_))), "{r:?}");
        assert_eq!(a.issued_count(), 1);
    }

    #[test]
    fn tokens_created_on_one_replica_are_accepted_by_another() {
        let shared = Arc::new(Shared::default());
        let (a, b) = (Tokens::in_memory(), Tokens::in_memory());
        a.share_state(shared.clone());
        let t = a
            .create(Scope::Workload {
                namespace: "n".parse().unwrap(),
                service: "s".parse().unwrap(),
            })
            .unwrap();
        assert_eq!(b.check_bearer(&t.bearer()), Err(crate::AuthError::Invalid));
        for r in shared.tokens.lock().clone() {
            assert!(r.secret_sha256.is_some());
            b.learn(r.clone());
            a.learn(r);
        }
        assert_eq!(b.check_bearer(&t.bearer()).unwrap(), t.scope);
        assert_eq!(a.check_bearer(&t.bearer()).unwrap(), t.scope);
        let forged = format!("{}.{}", t.id, "0".repeat(40));
        assert_eq!(b.check_bearer(&forged), Err(crate::AuthError::Invalid));
        // What a replica publishes at start: its own tokens, with the secret's hash.
        let own = a.own_records();
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].secret_sha256, shared.tokens.lock()[0].secret_sha256);
        assert!(b.own_records().is_empty());
    }
}
