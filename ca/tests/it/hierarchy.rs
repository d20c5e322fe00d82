//! CA directory, issuance, extensions, revocation and state, checked with openssl and x509-parser.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use trellis_ca::{CaDir, CaError, Policy, RevokeReason, Serial, VerifiedCsr, generate_key_and_csr};
use trellis_core::SpiffeId;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::support::{run, tool, write};

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn issue(a: &trellis_ca::Authority, who: &str) -> trellis_ca::Issued {
    let (_k, csr) = generate_key_and_csr().unwrap();
    a.issue(
        &VerifiedCsr::parse(csr.as_bytes()).unwrap(),
        &id(who),
        None,
        false,
        "test",
    )
    .unwrap()
}

#[test]
fn init_writes_hierarchy_with_right_extensions_and_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = CaDir::new(tmp.path().join("ca"));
    let a = dir
        .init("mesh.local".parse().unwrap(), Policy::default())
        .unwrap();
    for key in ["root.key", "intermediate.key", "token.key"] {
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
        let text = std::fs::read_to_string(dir.path().join(key)).unwrap();
        if key.ends_with(".key") && key != "token.key" {
            assert!(
                text.starts_with("-----BEGIN PRIVATE KEY-----"),
                "PKCS#8: {key}"
            );
        }
    }
    // Refuses to overwrite.
    assert!(matches!(
        dir.init("mesh.local".parse().unwrap(), Policy::default()),
        Err(CaError::AlreadyExists(_))
    ));

    let root_pem = std::fs::read_to_string(dir.path().join("root.crt")).unwrap();
    let root_der = pem::parse(&root_pem).unwrap().into_contents();
    let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
    let bc = root.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(1));
    let life = root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
    assert!(life > 9 * 365 * 86400 && life < 11 * 365 * 86400);
    let (_, inter) = x509_parser::parse_x509_certificate(a.intermediate()).unwrap();
    let bc = inter.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    assert_eq!(inter.issuer(), root.subject());

    // A leaf.
    let issued = issue(&a, "spiffe://mesh.local/ns/my-app/svc/api");
    let (_, leaf) = x509_parser::parse_x509_certificate(issued.leaf()).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    let names: Vec<String> = san
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        [
            "URI:spiffe://mesh.local/ns/my-app/svc/api",
            "DNS:api.my-app"
        ]
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    let ski = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("SKI");
    assert!(!ski.is_empty());
    let aki = leaf
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(k) => {
                k.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("AKI");
    let inter_ski = inter
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .unwrap();
    assert_eq!(aki, inter_ski);
    assert_eq!(leaf.serial.to_bytes_be().len(), 16, "128-bit serial");
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now - nb - 60).abs() <= 5, "notBefore one minute back");
    assert!((na - now - 24 * 3600).abs() <= 5, "default TTL 24h");
    // Max TTL is enforced.
    let (_k, csr) = generate_key_and_csr().unwrap();
    let err = a
        .issue(
            &VerifiedCsr::parse(csr.as_bytes()).unwrap(),
            &id("spiffe://mesh.local/ns/my-app/svc/api"),
            Some(Duration::from_secs(30 * 86400)),
            false,
            "test",
        )
        .unwrap_err();
    assert!(matches!(err, CaError::TtlTooLong { .. }));
    // Another trust domain is refused.
    let (_k, csr) = generate_key_and_csr().unwrap();
    assert!(
        a.issue(
            &VerifiedCsr::parse(csr.as_bytes()).unwrap(),
            &id("spiffe://other.local/ns/my-app/svc/api"),
            None,
            false,
            "test",
        )
        .is_err()
    );

    // openssl agrees on the chain.
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let leaf_path = write(tmp.path(), "leaf.pem", &issued.leaf_pem());
    let (ok, out) = run(Command::new(&openssl)
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.path().join("root.crt"))
        .arg("-untrusted")
        .arg(dir.path().join("intermediate.crt"))
        .arg("-purpose")
        .arg("sslclient")
        .arg(&leaf_path));
    assert!(ok, "{out}");
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn openssl_csr_rsa_and_bad_signature() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let a =
        trellis_ca::Authority::in_memory("mesh.local".parse().unwrap(), Policy::default()).unwrap();
    let key = tmp.path().join("k.pem");
    let csr = tmp.path().join("c.pem");
    // RSA-2048 from openssl: accepted.
    let (ok, out) = run(Command::new(&openssl)
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=ignored",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    assert!(ok, "{out}");
    let pem_text = std::fs::read(&csr).unwrap();
    let v = VerifiedCsr::parse(&pem_text).unwrap();
    let issued = a
        .issue(&v, &id("spiffe://mesh.local/ns/a/svc/b"), None, false, "t")
        .unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(issued.leaf()).unwrap();
    assert!(
        leaf.subject().iter_common_name().next().is_none(),
        "the CA decides the subject"
    );
    // RSA-1024: rejected.
    let (ok, out) = run(Command::new(&openssl)
        .args([
            "req", "-new", "-newkey", "rsa:1024", "-nodes", "-subj", "/CN=x",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    assert!(ok, "{out}");
    assert!(matches!(
        VerifiedCsr::parse(&std::fs::read(&csr).unwrap()),
        Err(CaError::WeakKey(_))
    ));
    // P-256 via openssl, then the signature is broken.
    let (ok, out) = run(Command::new(&openssl)
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=x",
            "-outform",
            "DER",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    assert!(ok, "{out}");
    let mut der = std::fs::read(&csr).unwrap();
    assert!(VerifiedCsr::from_der(&der).is_ok());
    // Flip a bit in the subject (signed data), so the signature no longer matches.
    let pos = der.windows(1).position(|w| w == b"x").unwrap();
    der[pos] = b'y';
    assert!(matches!(
        VerifiedCsr::from_der(&der),
        Err(CaError::BadCsrSignature)
    ));
}

#[test]
fn revocation_crl_and_restart_keep_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = CaDir::new(tmp.path().join("ca"));
    let a = dir
        .init("mesh.local".parse().unwrap(), Policy::default())
        .unwrap();
    let good = issue(&a, "spiffe://mesh.local/ns/n/svc/good");
    let bad = issue(&a, "spiffe://mesh.local/ns/n/svc/bad");
    a.revoke(&bad.serial, RevokeReason::KeyCompromise, "test")
        .unwrap();
    assert!(matches!(
        a.revoke(&bad.serial, RevokeReason::KeyCompromise, "test"),
        Err(CaError::AlreadyRevoked(_))
    ));
    assert!(matches!(
        a.revoke(&Serial::random(), RevokeReason::KeyCompromise, "test"),
        Err(CaError::UnknownSerial(_))
    ));
    let inter_before = a.intermediate().clone();
    drop(a);

    // Restart: same keys, same index, same audit log.
    let a = dir.open().unwrap();
    assert_eq!(a.intermediate(), &inter_before);
    assert_eq!(a.issued_count(), 2);
    assert_eq!(a.revoked(), vec![bad.serial]);
    assert!(a.certificate(&good.serial).is_some());
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["serial"], good.serial.to_string());
    assert_eq!(lines[0]["spiffe_id"], "spiffe://mesh.local/ns/n/svc/good");
    for k in ["time", "requester", "not_after"] {
        assert!(lines[0].get(k).is_some(), "{k}");
    }
    let third = issue(&a, "spiffe://mesh.local/ns/n/svc/third");
    assert!(third.serial != good.serial && third.serial != bad.serial);

    let Some(openssl) = tool("openssl") else {
        return;
    };
    // CA file = root + intermediate, CRL from the CA dir.
    let cafile = write(
        tmp.path(),
        "cafile.pem",
        &format!(
            "{}{}",
            std::fs::read_to_string(dir.path().join("root.crt")).unwrap(),
            a.intermediate_pem()
        ),
    );
    for (leaf, expect_ok) in [(&good, true), (&bad, false)] {
        let lp = write(tmp.path(), "leaf.pem", &leaf.leaf_pem());
        let (ok, out) = run(Command::new(&openssl)
            .arg("verify")
            .arg("-crl_check")
            .arg("-CAfile")
            .arg(&cafile)
            .arg("-CRLfile")
            .arg(dir.path().join("crl.pem"))
            .arg(&lp));
        assert_eq!(ok, expect_ok, "{out}");
        if !expect_ok {
            assert!(out.contains("revoked"), "{out}");
        }
    }
    // The CRL is signed by the intermediate.
    let (ok, out) = run(Command::new(&openssl)
        .args(["crl", "-noout", "-CAfile"])
        .arg(&cafile)
        .arg("-in")
        .arg(dir.path().join("crl.pem")));
    assert!(ok && out.contains("verify OK"), "{out}");
}

#[test]
fn corrupt_state_is_named_never_a_new_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = CaDir::new(tmp.path().join("ca"));
    let a = dir
        .init("mesh.local".parse().unwrap(), Policy::default())
        .unwrap();
    issue(&a, "spiffe://mesh.local/ns/n/svc/a");
    drop(a);
    let backup = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    for name in [
        "index.jsonl",
        "intermediate.key",
        "root.key",
        "intermediate.crt",
        "audit.jsonl",
        "ca.json",
    ] {
        let orig = backup(name);
        std::fs::write(dir.path().join(name), &orig[..orig.len() / 2]).unwrap();
        let err = dir.open().unwrap_err().to_string();
        assert!(err.contains(name), "{name}: {err}");
        std::fs::write(dir.path().join(name), &orig).unwrap();
    }
    dir.open().unwrap();
    // Missing directory: not initialized, and init elsewhere still refuses an existing CA.
    let empty = CaDir::new(tmp.path().join("nothing"));
    assert!(matches!(empty.open(), Err(CaError::NotInitialized(_))));
}

#[test]
fn concurrent_issuance_gives_unique_serials() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = CaDir::new(tmp.path().join("ca"));
    let a = dir
        .init("mesh.local".parse().unwrap(), Policy::default())
        .unwrap();
    let csrs: Vec<_> = (0..100)
        .map(|_| {
            let (_k, csr) = generate_key_and_csr().unwrap();
            VerifiedCsr::parse(csr.as_bytes()).unwrap()
        })
        .collect();
    let serials: Vec<Serial> = std::thread::scope(|s| {
        let handles: Vec<_> = csrs
            .iter()
            .enumerate()
            .map(|(i, csr)| {
                let a = a.clone();
                s.spawn(move || {
                    a.issue(
                        csr,
                        &id(&format!("spiffe://mesh.local/ns/n/svc/s{i}")),
                        None,
                        false,
                        "t",
                    )
                    .unwrap()
                    .serial
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let unique: std::collections::HashSet<_> = serials.iter().collect();
    assert_eq!(unique.len(), 100);
    drop(a);
    let a = dir.open().unwrap();
    assert_eq!(a.issued_count(), 100);
    let index = std::fs::read_to_string(dir.path().join("index.jsonl")).unwrap();
    assert_eq!(index.lines().count(), 100);
}

#[test]
fn external_root_flow() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = CaDir::new(tmp.path().join("ca"));
    let csr_path = dir
        .init_external_root("mesh.local".parse().unwrap(), Policy::default())
        .unwrap();
    assert!(matches!(dir.open(), Err(CaError::IntermediatePending(_))));
    // "Elsewhere": another CA signs the intermediate CSR with rcgen.
    let ext_key = rcgen::KeyPair::generate().unwrap();
    let mut rp = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(1));
    rp.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ext_root = rp.self_signed(&ext_key).unwrap();
    let ext_issuer = rcgen::Issuer::new(rp, &ext_key);
    let csr_pem = std::fs::read_to_string(&csr_path).unwrap();
    let mut req = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
    req.params.use_authority_key_identifier_extension = true;
    let inter = req.signed_by(&ext_issuer).unwrap();
    // A certificate for some other key is refused.
    let other = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    assert!(matches!(
        dir.install_intermediate(&other.pem(), &ext_root.pem()),
        Err(CaError::Mismatch(_))
    ));
    let a = dir
        .install_intermediate(&inter.pem(), &ext_root.pem())
        .unwrap();
    let issued = issue(&a, "spiffe://mesh.local/ns/n/svc/a");
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let root_path = write(tmp.path(), "ext-root.pem", &ext_root.pem());
    let chain = write(tmp.path(), "chain.pem", a.intermediate_pem());
    let leaf = write(tmp.path(), "leaf.pem", &issued.leaf_pem());
    let (ok, out) = run(Command::new(&openssl)
        .arg("verify")
        .arg("-CAfile")
        .arg(&root_path)
        .arg("-untrusted")
        .arg(&chain)
        .arg(&leaf));
    assert!(ok, "{out}");
}

#[test]
fn metrics_render_has_live_expiry_gauges() {
    let a =
        trellis_ca::Authority::in_memory("mesh.local".parse().unwrap(), Policy::default()).unwrap();
    let text = a.metrics().render();
    for cert in ["root", "intermediate"] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "trellis_ca_cert_expiry_seconds{{cert=\"{cert}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("{cert}: {text}"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v > 4.0 * 365.0 * 86400.0, "{line}");
    }
}
