//! The signing authority: the intermediate key that signs workload certificates, the issuance
//! index, revocation and the CRL. Cheap to clone; safe to use from many tasks at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::{Mutex, RwLock};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use trellis_core::{SpiffeId, TrustDomain};

use crate::csr::VerifiedCsr;
use crate::error::CaError;
use crate::journal;
use crate::metrics::CaMetrics;
use crate::policy::{BACKDATE, DnsSans, Policy};
use crate::serial::Serial;
use crate::state::{CaState, NoState};

/// Root lifetime.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Intermediate lifetime.
pub const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Serials drawn again after a collision in shared state before the issuance fails.
const MAX_SERIAL_COLLISIONS: u32 = 3;
/// Lifetime of each generated CRL (it is regenerated on every revocation and at start).
pub const CRL_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// A freshly issued workload certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub serial: Serial,
    pub spiffe_id: SpiffeId,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Leaf first, then the intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    /// The same chain as PEM.
    pub chain_pem: String,
}

impl Issued {
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
    pub fn leaf_pem(&self) -> String {
        to_pem("CERTIFICATE", &self.chain[0])
    }
}

/// Why a certificate was revoked (RFC 5280 names, as the CLI and APIs spell them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RevokeReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    CertificateHold,
    PrivilegeWithdrawn,
    AaCompromise,
}

impl std::str::FromStr for RevokeReason {
    type Err = CaError;
    fn from_str(s: &str) -> Result<Self, CaError> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
            CaError::InvalidRequest(format!(
                "unknown revocation reason {s:?} (e.g. keyCompromise, superseded, cessationOfOperation)"
            ))
        })
    }
}

impl RevokeReason {
    fn to_rcgen(self) -> RevocationReason {
        match self {
            RevokeReason::Unspecified => RevocationReason::Unspecified,
            RevokeReason::KeyCompromise => RevocationReason::KeyCompromise,
            RevokeReason::CaCompromise => RevocationReason::CaCompromise,
            RevokeReason::AffiliationChanged => RevocationReason::AffiliationChanged,
            RevokeReason::Superseded => RevocationReason::Superseded,
            RevokeReason::CessationOfOperation => RevocationReason::CessationOfOperation,
            RevokeReason::CertificateHold => RevocationReason::CertificateHold,
            RevokeReason::PrivilegeWithdrawn => RevocationReason::PrivilegeWithdrawn,
            RevokeReason::AaCompromise => RevocationReason::AaCompromise,
        }
    }
}

/// One line of `index.jsonl` (and one `issued/` or `revoked/` record of a shared [`CaState`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum IndexRecord {
    Issued {
        serial: String,
        spiffe_id: String,
        not_after: i64,
        /// base64 DER of the leaf.
        cert: String,
    },
    Revoked {
        serial: String,
        reason: RevokeReason,
        time: i64,
    },
}

/// One line of `audit.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub event: String,
    pub serial: String,
    pub spiffe_id: String,
    pub requester: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

#[derive(Debug, Clone)]
struct Entry {
    spiffe_id: String,
    not_after: OffsetDateTime,
    cert: Option<CertificateDer<'static>>,
    revoked: Option<(RevokeReason, OffsetDateTime)>,
    /// Signed by another replica's intermediate (learned from shared state): not in our CRL.
    foreign: bool,
}

struct Inner {
    trust_domain: TrustDomain,
    policy: Policy,
    issuer: Issuer<'static, KeyPair>,
    intermediate: CertificateDer<'static>,
    intermediate_pem: String,
    intermediate_not_after: OffsetDateTime,
    root_not_after: Option<OffsetDateTime>,
    roots: ArcSwap<Vec<CertificateDer<'static>>>,
    /// Raw subject of the intermediate: a learned leaf with this issuer is ours.
    subject: Vec<u8>,
    entries: Mutex<HashMap<Serial, Entry>>,
    dir: Option<PathBuf>,
    state: RwLock<Arc<dyn CaState>>,
    crl: ArcSwap<String>,
    metrics: CaMetrics,
}

/// The signing side of the CA. Clone freely: all clones share one index and key.
#[derive(Clone)]
pub struct Authority {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.inner.trust_domain)
            .finish_non_exhaustive()
    }
}

/// Material to build an [`Authority`] from.
pub(crate) struct Parts {
    pub trust_domain: TrustDomain,
    pub policy: Policy,
    pub intermediate_key: KeyPair,
    pub intermediate: CertificateDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    pub root_not_after: Option<OffsetDateTime>,
    /// The CA directory and its journals; `None` for an in-memory CA.
    pub files: Option<(PathBuf, crate::state::JournalState)>,
    pub index: Vec<IndexRecord>,
}

impl Authority {
    pub(crate) fn from_parts(p: Parts) -> Result<Self, CaError> {
        let (_, x509) = x509_parser::parse_x509_certificate(&p.intermediate)
            .map_err(|e| CaError::Internal(format!("intermediate certificate: {e}")))?;
        let intermediate_not_after = x509.validity().not_after.to_datetime();
        let subject = x509.subject().as_raw().to_vec();
        let issuer = Issuer::from_ca_cert_der(&p.intermediate, p.intermediate_key)?;
        let mut entries = HashMap::new();
        for rec in p.index {
            apply_record(&mut entries, rec, false)?;
        }
        let (dir, state): (_, Arc<dyn CaState>) = match p.files {
            Some((dir, journals)) => (Some(dir), Arc::new(journals)),
            None => (None, Arc::new(NoState)),
        };
        let me = Self {
            inner: Arc::new(Inner {
                trust_domain: p.trust_domain,
                policy: p.policy,
                issuer,
                intermediate_pem: to_pem("CERTIFICATE", &p.intermediate),
                intermediate: p.intermediate,
                intermediate_not_after,
                root_not_after: p.root_not_after,
                roots: ArcSwap::from_pointee(p.roots),
                subject,
                entries: Mutex::new(entries),
                dir,
                state: RwLock::new(state),
                crl: ArcSwap::from_pointee(String::new()),
                metrics: CaMetrics::new(),
            }),
        };
        me.regenerate_crl()?;
        me.update_expiry_gauges();
        Ok(me)
    }

    /// A CA that lives only in memory (no files): root and intermediate are generated now.
    /// Used by tests, the demo and benchmarks.
    pub fn in_memory(trust_domain: TrustDomain, policy: Policy) -> Result<Self, CaError> {
        let h = Hierarchy::generate(&trust_domain)?;
        Self::from_parts(Parts {
            trust_domain,
            policy,
            intermediate_key: h.intermediate_key,
            intermediate: h.intermediate,
            root_not_after: Some(h.root_not_after),
            roots: vec![h.root],
            files: None,
            index: Vec::new(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }
    pub fn metrics(&self) -> &CaMetrics {
        &self.inner.metrics
    }
    pub fn intermediate(&self) -> &CertificateDer<'static> {
        &self.inner.intermediate
    }
    pub fn intermediate_pem(&self) -> &str {
        &self.inner.intermediate_pem
    }
    /// The trust bundle: every root a peer should accept (the CA's own root first).
    pub fn roots(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.inner.roots.load_full()
    }
    pub fn roots_pem(&self) -> String {
        self.roots()
            .iter()
            .map(|c| to_pem("CERTIFICATE", c))
            .collect()
    }
    pub fn set_roots(&self, roots: Vec<CertificateDer<'static>>) {
        self.inner.roots.store(Arc::new(roots));
    }
    /// The current CRL (PEM), signed by the intermediate.
    pub fn crl_pem(&self) -> Arc<String> {
        self.inner.crl.load_full()
    }
    /// The directory this CA persists to, if any.
    pub fn dir(&self) -> Option<PathBuf> {
        self.inner.dir.clone()
    }

    /// Signs a workload certificate for `id` over the CSR's key. `ttl` defaults to the policy
    /// default; above the maximum it is refused, or clamped when `clamp_ttl`.
    pub fn issue(
        &self,
        csr: &VerifiedCsr,
        id: &SpiffeId,
        ttl: Option<Duration>,
        clamp_ttl: bool,
        requester: &str,
    ) -> Result<Issued, CaError> {
        self.issue_now(csr, id, (ttl, clamp_ttl), requester, &[])
    }

    /// Signs the control plane's own API certificate: its reserved SPIFFE id plus `names` as DNS
    /// or IP SANs, so that clients checking host names (the `aws` CLI, curl) accept it too. Only
    /// reachable in-process: no token can ask for this identity.
    pub fn issue_control_plane(
        &self,
        csr: &VerifiedCsr,
        names: &[String],
        ttl: Option<Duration>,
    ) -> Result<Issued, CaError> {
        let id = SpiffeId::control_plane(self.inner.trust_domain.clone());
        let extra = san_list(names)?;
        self.issue_now(csr, &id, (ttl, true), "control-plane", &extra)
    }

    /// Valid from now (backdated) for the policy's TTL; counted in the metrics.
    fn issue_now(
        &self,
        csr: &VerifiedCsr,
        id: &SpiffeId,
        (ttl, clamp_ttl): (Option<Duration>, bool),
        requester: &str,
        extra: &[SanType],
    ) -> Result<Issued, CaError> {
        let start = Instant::now();
        let res = self.inner.policy.ttl(ttl, clamp_ttl).and_then(|ttl| {
            let now = OffsetDateTime::now_utc();
            self.issue_loop(csr, id, now - BACKDATE, now + ttl, requester, extra)
        });
        self.observe(start, &res);
        res
    }

    /// Records the outcome of an issuance attempt in the metrics.
    pub(crate) fn observe<T>(&self, start: Instant, res: &Result<T, CaError>) {
        let m = &self.inner.metrics;
        match res {
            Ok(_) => {
                m.issued.inc();
                m.latency.observe(start.elapsed().as_secs_f64());
            }
            Err(e) => m.errors.with_label_values(&[e.reason()]).inc(),
        }
    }

    /// Counts a request rejected before it reached the signer (bad token, bad CSR...).
    pub fn count_error(&self, reason: &str) {
        self.inner.metrics.errors.with_label_values(&[reason]).inc();
    }

    /// Signs with an explicit validity window, bypassing the TTL policy. For tests (expired
    /// certificates) and tools; production paths use [`Authority::issue`].
    pub fn issue_with_validity(
        &self,
        csr: &VerifiedCsr,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        requester: &str,
    ) -> Result<Issued, CaError> {
        self.issue_loop(csr, id, not_before, not_after, requester, &[])
    }

    /// Signs `id` (plus `extra` SANs), drawing a new serial while another replica holds the one
    /// drawn.
    fn issue_loop(
        &self,
        csr: &VerifiedCsr,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        requester: &str,
        extra: &[SanType],
    ) -> Result<Issued, CaError> {
        if id.trust_domain() != &self.inner.trust_domain {
            return Err(CaError::InvalidRequest(format!(
                "identity {id} is outside this CA's trust domain {}",
                self.inner.trust_domain
            )));
        }
        // Truncate to whole seconds: X.509 time has second precision.
        let not_before = not_before.replace_nanosecond(0).unwrap_or(not_before);
        let not_after = not_after.replace_nanosecond(0).unwrap_or(not_after);
        let mut collisions = 0;
        loop {
            let serial = self.reserve_serial(id, not_after);
            let validity = (not_before, not_after);
            let res = self.sign_and_record(csr, id, serial, validity, requester, extra);
            if res.is_err() {
                self.inner.entries.lock().remove(&serial);
            }
            match res {
                // Another replica recorded this serial first (shared state): draw another.
                Err(CaError::SerialTaken(_)) if collisions < MAX_SERIAL_COLLISIONS => {
                    collisions += 1;
                }
                res => return res,
            }
        }
    }

    fn reserve_serial(&self, id: &SpiffeId, not_after: OffsetDateTime) -> Serial {
        let mut entries = self.inner.entries.lock();
        loop {
            let s = Serial::random();
            if let std::collections::hash_map::Entry::Vacant(v) = entries.entry(s) {
                v.insert(Entry {
                    spiffe_id: id.to_string(),
                    not_after,
                    cert: None,
                    revoked: None,
                    foreign: false,
                });
                return s;
            }
        }
    }

    fn sign_and_record(
        &self,
        csr: &VerifiedCsr,
        id: &SpiffeId,
        serial: Serial,
        (not_before, not_after): (OffsetDateTime, OffsetDateTime),
        requester: &str,
        extra: &[SanType],
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(SerialNumber::from_slice(serial.as_bytes()));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let mut sans =
            vec![SanType::URI(id.to_uri().try_into().map_err(|e| {
                CaError::Internal(format!("SPIFFE id as IA5String: {e}"))
            })?)];
        if self.inner.policy.dns_sans == DnsSans::ServiceNamespace {
            let dns = format!("{}.{}", id.service(), id.namespace());
            sans.push(SanType::DnsName(dns.try_into().map_err(|e| {
                CaError::Internal(format!("DNS SAN as IA5String: {e}"))
            })?));
        }
        sans.extend_from_slice(extra);
        params.subject_alt_names = sans;
        let leaf = params.signed_by(&csr.spki, &self.inner.issuer)?;
        let leaf_der = leaf.der().clone();

        let now = OffsetDateTime::now_utc();
        let audit = AuditRecord {
            time: now,
            event: "issue".into(),
            serial: serial.to_string(),
            spiffe_id: id.to_string(),
            requester: requester.to_owned(),
            not_after,
        };
        let index = IndexRecord::Issued {
            serial: serial.to_string(),
            spiffe_id: id.to_string(),
            not_after: not_after.unix_timestamp(),
            cert: base64_encode(&leaf_der),
        };
        self.record(&audit, &index)?;
        if let Some(e) = self.inner.entries.lock().get_mut(&serial) {
            e.cert = Some(leaf_der.clone());
        }
        let chain = vec![leaf_der, self.inner.intermediate.clone()];
        let chain_pem = format!("{}{}", leaf.pem(), self.inner.intermediate_pem);
        Ok(Issued {
            serial,
            spiffe_id: id.clone(),
            not_before,
            not_after,
            chain,
            chain_pem,
        })
    }

    /// Records audit and index durably (the CA's [`CaState`]) before anything is returned.
    fn record(&self, audit: &AuditRecord, index: &IndexRecord) -> Result<(), CaError> {
        let state = Arc::clone(&self.inner.state.read());
        state.record(index, audit)
    }

    /// Moves this CA's serials, revocations and audit log to shared state (several replicas of
    /// one CA service); what was recorded before stays where it was.
    pub fn share_state(&self, state: Arc<dyn CaState>) {
        *self.inner.state.write() = state;
    }

    /// The audit log, oldest first (from the CA's [`CaState`]).
    pub fn audit_log(&self) -> Result<Vec<AuditRecord>, CaError> {
        let state = Arc::clone(&self.inner.state.read());
        state.audit_log()
    }

    /// Applies records other replicas wrote to the shared state (or this one's own, echoed back:
    /// known records are ignored), in the order they were written. When one revokes a certificate
    /// of this CA, the CRL is re-signed once for the batch.
    pub fn learn(&self, records: impl IntoIterator<Item = IndexRecord>) -> Result<(), CaError> {
        let mut own_revoked = 0;
        let mut failed = None;
        {
            let mut entries = self.inner.entries.lock();
            for record in records {
                match self.learn_one(&mut entries, record) {
                    Ok(own) => own_revoked += u64::from(own),
                    Err(e) => failed = Some(e),
                }
            }
        }
        if own_revoked > 0 {
            self.inner.metrics.revoked.inc_by(own_revoked);
            self.regenerate_crl()?;
        }
        failed.map_or(Ok(()), Err)
    }

    /// One learned record; `true` when it revoked one of this CA's certificates.
    fn learn_one(
        &self,
        entries: &mut HashMap<Serial, Entry>,
        record: IndexRecord,
    ) -> Result<bool, CaError> {
        match &record {
            IndexRecord::Issued { serial, cert, .. } => {
                let s: Serial = serial.parse()?;
                if entries.contains_key(&s) {
                    return Ok(false);
                }
                let foreign = base64_decode(cert).is_none_or(|der| {
                    x509_parser::parse_x509_certificate(&der)
                        .map(|(_, x)| x.issuer().as_raw() != self.inner.subject.as_slice())
                        .unwrap_or(true)
                });
                apply_record(entries, record, foreign)?;
                Ok(false)
            }
            IndexRecord::Revoked { serial, .. } => {
                let s: Serial = serial.parse()?;
                match entries.get(&s) {
                    Some(e) if e.revoked.is_none() => {
                        let own = !e.foreign;
                        apply_record(entries, record, false)?;
                        Ok(own)
                    }
                    _ => Ok(false),
                }
            }
        }
    }

    /// Looks up an issued certificate (leaf DER) by serial.
    pub fn certificate(&self, serial: &Serial) -> Option<CertificateDer<'static>> {
        self.inner
            .entries
            .lock()
            .get(serial)
            .and_then(|e| e.cert.clone())
    }

    /// How many certificates this CA has issued (from the index).
    pub fn issued_count(&self) -> usize {
        self.inner.entries.lock().len()
    }

    /// Revokes a certificate, records it durably and regenerates the CRL.
    pub fn revoke(
        &self,
        serial: &Serial,
        reason: RevokeReason,
        requester: &str,
    ) -> Result<(), CaError> {
        let now = OffsetDateTime::now_utc();
        let (spiffe_id, not_after) = {
            let mut entries = self.inner.entries.lock();
            let e = entries
                .get_mut(serial)
                .ok_or_else(|| CaError::UnknownSerial(serial.to_string()))?;
            if e.revoked.is_some() {
                return Err(CaError::AlreadyRevoked(serial.to_string()));
            }
            e.revoked = Some((reason, now));
            (e.spiffe_id.clone(), e.not_after)
        };
        let audit = AuditRecord {
            time: now,
            event: format!(
                "revoke:{}",
                serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ),
            serial: serial.to_string(),
            spiffe_id,
            requester: requester.to_owned(),
            not_after,
        };
        let index = IndexRecord::Revoked {
            serial: serial.to_string(),
            reason,
            time: now.unix_timestamp(),
        };
        if let Err(e) = self.record(&audit, &index) {
            if let Some(e) = self.inner.entries.lock().get_mut(serial) {
                e.revoked = None;
            }
            return Err(e);
        }
        self.inner.metrics.revoked.inc();
        self.regenerate_crl()
    }

    /// Re-signs the CRL from the index; writes `crl.pem` when the CA has a directory.
    pub fn regenerate_crl(&self) -> Result<(), CaError> {
        let now = OffsetDateTime::now_utc();
        let mut revoked: Vec<RevokedCertParams> = {
            let entries = self.inner.entries.lock();
            entries
                .iter()
                .filter(|(_, e)| !e.foreign)
                .filter_map(|(s, e)| {
                    e.revoked.map(|(reason, at)| RevokedCertParams {
                        serial_number: SerialNumber::from_slice(s.as_bytes()),
                        revocation_time: at.replace_nanosecond(0).unwrap_or(at),
                        reason_code: Some(reason.to_rcgen()),
                        invalidity_date: None,
                    })
                })
                .collect()
        };
        revoked.sort_by_key(|r| r.revocation_time);
        let params = CertificateRevocationListParams {
            this_update: (now - BACKDATE).replace_nanosecond(0).unwrap_or(now),
            next_update: (now + CRL_LIFETIME).replace_nanosecond(0).unwrap_or(now),
            // Seconds since the epoch: monotonic across restarts without extra state.
            crl_number: SerialNumber::from(now.unix_timestamp().max(1) as u64),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.inner.issuer)?;
        let pem = crl.pem()?;
        if let Some(dir) = self.dir() {
            journal::write_atomic(&dir.join(crate::ca_dir::CRL), pem.as_bytes(), 0o644)?;
        }
        self.inner.crl.store(Arc::new(pem));
        Ok(())
    }

    /// Serials currently revoked.
    pub fn revoked(&self) -> Vec<Serial> {
        self.inner
            .entries
            .lock()
            .iter()
            .filter(|(_, e)| e.revoked.is_some())
            .map(|(s, _)| *s)
            .collect()
    }

    /// Refreshes the CA certificate expiry gauges (also done by every metrics render).
    pub fn update_expiry_gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let m = &self.inner.metrics;
        m.intermediate_not_after
            .store(self.inner.intermediate_not_after.unix_timestamp(), Relaxed);
        if let Some(r) = self.inner.root_not_after {
            m.root_not_after.store(r.unix_timestamp(), Relaxed);
        }
        m.refresh_expiry();
    }

    /// Expiry of the intermediate certificate.
    pub fn intermediate_not_after(&self) -> OffsetDateTime {
        self.inner.intermediate_not_after
    }
}

fn apply_record(
    entries: &mut HashMap<Serial, Entry>,
    rec: IndexRecord,
    foreign: bool,
) -> Result<(), CaError> {
    match rec {
        IndexRecord::Issued {
            serial,
            spiffe_id,
            not_after,
            cert,
        } => {
            let s: Serial = serial.parse()?;
            let cert = base64_decode(&cert)
                .map(CertificateDer::from)
                .ok_or_else(|| {
                    CaError::InvalidRequest(format!("certificate {serial} is not base64"))
                })?;
            let not_after = OffsetDateTime::from_unix_timestamp(not_after)
                .map_err(|e| CaError::InvalidRequest(e.to_string()))?;
            if entries
                .insert(
                    s,
                    Entry {
                        spiffe_id,
                        not_after,
                        cert: Some(cert),
                        revoked: None,
                        foreign,
                    },
                )
                .is_some()
            {
                return Err(CaError::InvalidRequest(format!(
                    "serial {serial} recorded twice"
                )));
            }
        }
        IndexRecord::Revoked {
            serial,
            reason,
            time,
        } => {
            let s: Serial = serial.parse()?;
            let at = OffsetDateTime::from_unix_timestamp(time)
                .map_err(|e| CaError::InvalidRequest(e.to_string()))?;
            let e = entries
                .get_mut(&s)
                .ok_or_else(|| CaError::UnknownSerial(serial.clone()))?;
            e.revoked = Some((reason, at));
        }
    }
    Ok(())
}

/// A freshly generated root + intermediate.
pub(crate) struct Hierarchy {
    pub root_key: KeyPair,
    pub root: CertificateDer<'static>,
    pub root_not_after: OffsetDateTime,
    pub intermediate_key: KeyPair,
    pub intermediate: CertificateDer<'static>,
}

impl Hierarchy {
    pub(crate) fn generate(td: &TrustDomain) -> Result<Self, CaError> {
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or(OffsetDateTime::now_utc());
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let root_params = root_params(td, now);
        let root_not_after = root_params.not_after;
        let root_cert = root_params.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root_params, &root_key);
        let intermediate_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let intermediate =
            intermediate_params(td, now).signed_by(&intermediate_key, &root_issuer)?;
        Ok(Self {
            root: root_cert.der().clone(),
            root_key,
            root_not_after,
            intermediate_key,
            intermediate: intermediate.der().clone(),
        })
    }
}

pub(crate) fn root_params(td: &TrustDomain, now: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "trellis");
    // A short random suffix keeps subjects distinct across rotations (path building by name).
    dn.push(
        DnType::CommonName,
        format!(
            "trellis root CA {td} {}",
            &Serial::random().to_string()[..8]
        ),
    );
    p.distinguished_name = dn;
    p.not_before = now - BACKDATE;
    p.not_after = now + ROOT_LIFETIME;
    p.serial_number = Some(SerialNumber::from_slice(Serial::random().as_bytes()));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

pub(crate) fn intermediate_params(td: &TrustDomain, now: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "trellis");
    dn.push(
        DnType::CommonName,
        format!(
            "trellis intermediate CA {td} {}",
            &Serial::random().to_string()[..8]
        ),
    );
    p.distinguished_name = dn;
    p.not_before = now - BACKDATE;
    p.not_after = now + INTERMEDIATE_LIFETIME;
    p.serial_number = Some(SerialNumber::from_slice(Serial::random().as_bytes()));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.use_authority_key_identifier_extension = true;
    p
}

pub(crate) fn to_pem(tag: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

pub(crate) fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub(crate) fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// Host names and IP addresses as SANs: an IP literal becomes an IP SAN, anything else a DNS
/// SAN.
fn san_list(names: &[String]) -> Result<Vec<SanType>, CaError> {
    names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) if n.is_empty() || n.contains(|c: char| c.is_whitespace() || c == '/') => Err(
                CaError::InvalidRequest(format!("{n:?} is not a host name or IP address")),
            ),
            Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(|e| {
                CaError::InvalidRequest(format!("{n:?} is not a host name or IP address: {e}"))
            }),
        })
        .collect()
}
