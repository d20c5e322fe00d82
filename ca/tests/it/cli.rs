//! The `trellis-ca` binary end to end: init, token, issue, revoke + openssl, serve + aws CLI.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::support::{run, tool, write};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-ca");

fn ca(args: &[&str]) -> String {
    let (ok, out) = run(Command::new(BIN).args(args));
    assert!(ok, "trellis-ca {args:?}: {out}");
    out
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &str) -> (Server, String, String) {
    serve_with(dir, &[])
}

fn serve_with(dir: &str, extra: &[&str]) -> (Server, String, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--dir", dir, "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "trellis-ca listening on http://127.0.0.1:PORT (CA ARN arn:...)"
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://") || w.starts_with("https://"))
        .unwrap()
        .to_owned();
    let arn = line
        .trim_end()
        .trim_end_matches(')')
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    (Server(child), url, arn)
}

#[test]
fn cli_issue_revoke_and_openssl_crl_check() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let d = dir.to_str().unwrap();
    ca(&["init", "--dir", d, "--trust-domain", "mesh.local"]);
    let (ok, out) =
        run(Command::new(BIN).args(["init", "--dir", d, "--trust-domain", "mesh.local"]));
    assert!(!ok && out.contains("refusing to overwrite"), "{out}");
    let prefix = tmp.path().join("api");
    let out = ca(&[
        "issue",
        "--dir",
        d,
        "--service",
        "api",
        "--namespace",
        "my-app",
        "--out",
        prefix.to_str().unwrap(),
    ]);
    let serial = out
        .split("serial=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let crt = tmp.path().join("api.crt");
    let key = tmp.path().join("api.key");
    assert!(crt.exists() && key.exists());
    let root = dir.join("root.crt");
    // Chain file = leaf + intermediate.
    let (ok, out) = run(Command::new(&openssl)
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg("-untrusted")
        .arg(&crt)
        .arg(&crt));
    assert!(ok, "{out}");
    // Key matches the certificate.
    let (_, m1) = run(Command::new(&openssl)
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(&crt));
    let (_, m2) = run(Command::new(&openssl)
        .args(["pkey", "-pubout", "-in"])
        .arg(&key));
    assert_eq!(m1, m2);

    ca(&["revoke", "--dir", d, &serial, "--reason", "keyCompromise"]);
    let cafile = write(
        tmp.path(),
        "cafile.pem",
        &(std::fs::read_to_string(&root).unwrap()
            + &std::fs::read_to_string(dir.join("intermediate.crt")).unwrap()),
    );
    let (ok, out) = run(Command::new(&openssl)
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(&cafile)
        .arg("-CRLfile")
        .arg(dir.join("crl.pem"))
        .arg(&crt));
    assert!(!ok && out.contains("revoked"), "{out}");
}

#[test]
fn aws_cli_documented_flow() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let Some(aws) = tool("aws") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let d = dir.to_str().unwrap();
    ca(&["init", "--dir", d, "--trust-domain", "mesh.local"]);
    let cred: serde_json::Value = serde_json::from_str(&ca(&[
        "token",
        "create",
        "--dir",
        d,
        "--namespace",
        "my-app",
        "--service",
        "api",
    ]))
    .unwrap();
    let other: serde_json::Value = serde_json::from_str(&ca(&[
        "token",
        "create",
        "--dir",
        d,
        "--namespace",
        "my-app",
        "--service",
        "db",
    ]))
    .unwrap();
    let (_server, url, arn) = serve(d);

    let aws_cmd = |cred: &serde_json::Value, args: &[&str]| {
        let mut c = Command::new(&aws);
        c.arg("acm-pca")
            .args(args)
            .args([
                "--endpoint-url",
                &url,
                "--region",
                "us-east-1",
                "--output",
                "json",
            ])
            .env(
                "AWS_ACCESS_KEY_ID",
                cred["aws_access_key_id"].as_str().unwrap(),
            )
            .env(
                "AWS_SECRET_ACCESS_KEY",
                cred["aws_secret_access_key"].as_str().unwrap(),
            )
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_MAX_ATTEMPTS", "1")
            .env_remove("AWS_PROFILE");
        run(&mut c)
    };

    // openssl req -new ... (the documented first step).
    let key = tmp.path().join("key.pem");
    let csr = tmp.path().join("csr.pem");
    let (ok, out) = run(Command::new(&openssl)
        .args([
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=api.my-app",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    assert!(ok, "{out}");
    let csr_arg = format!("fileb://{}", csr.display());

    let (ok, out) = aws_cmd(
        &cred,
        &[
            "issue-certificate",
            "--certificate-authority-arn",
            &arn,
            "--csr",
            &csr_arg,
            "--signing-algorithm",
            "SHA256WITHRSA",
            "--validity",
            "Value=365,Type=DAYS",
            "--idempotency-token",
            "1234",
        ],
    );
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cert_arn = v["CertificateArn"].as_str().unwrap().to_owned();
    assert!(
        cert_arn.starts_with(&format!("{arn}/certificate/")),
        "{cert_arn}"
    );

    let (ok, out) = aws_cmd(
        &cred,
        &[
            "get-certificate",
            "--certificate-authority-arn",
            &arn,
            "--certificate-arn",
            &cert_arn,
        ],
    );
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let leaf = write(tmp.path(), "leaf.pem", v["Certificate"].as_str().unwrap());
    let chain = write(
        tmp.path(),
        "chain.pem",
        v["CertificateChain"].as_str().unwrap(),
    );
    let root = dir.join("root.crt");
    let (ok, out) = run(Command::new(&openssl)
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg("-untrusted")
        .arg(&chain)
        .arg(&leaf));
    assert!(ok, "{out}");
    let (_, text) = run(Command::new(&openssl)
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&leaf));
    assert!(
        text.contains("URI:spiffe://mesh.local/ns/my-app/svc/api"),
        "{text}"
    );

    let (ok, out) = aws_cmd(
        &cred,
        &[
            "get-certificate-authority-certificate",
            "--certificate-authority-arn",
            &arn,
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = aws_cmd(
        &cred,
        &[
            "describe-certificate-authority",
            "--certificate-authority-arn",
            &arn,
        ],
    );
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["CertificateAuthority"]["Status"], "ACTIVE");

    // Errors with AWS names.
    let (ok, out) = aws_cmd(
        &cred,
        &[
            "describe-certificate-authority",
            "--certificate-authority-arn",
            "arn:aws:acm-pca:us-east-1:000000000000:certificate-authority/nope",
        ],
    );
    assert!(!ok && out.contains("ResourceNotFoundException"), "{out}");
    let bad = serde_json::json!({"aws_access_key_id": "TRLNOPE", "aws_secret_access_key": "x"});
    let (ok, out) = aws_cmd(
        &bad,
        &[
            "describe-certificate-authority",
            "--certificate-authority-arn",
            &arn,
        ],
    );
    assert!(!ok && out.contains("UnrecognizedClientException"), "{out}");
    let forged = serde_json::json!({"aws_access_key_id": cred["aws_access_key_id"], "aws_secret_access_key": "0".repeat(40)});
    let (ok, out) = aws_cmd(
        &forged,
        &[
            "describe-certificate-authority",
            "--certificate-authority-arn",
            &arn,
        ],
    );
    assert!(!ok && out.contains("InvalidSignatureException"), "{out}");
    // Another service's credential cannot revoke api's certificate.
    let serial = cert_arn.rsplit('/').next().unwrap().to_owned();
    let (ok, out) = aws_cmd(
        &other,
        &[
            "revoke-certificate",
            "--certificate-authority-arn",
            &arn,
            "--certificate-serial",
            &serial,
            "--revocation-reason",
            "KEY_COMPROMISE",
        ],
    );
    assert!(!ok && out.contains("AccessDeniedException"), "{out}");
    let (ok, out) = aws_cmd(
        &cred,
        &[
            "revoke-certificate",
            "--certificate-authority-arn",
            &arn,
            "--certificate-serial",
            &serial,
            "--revocation-reason",
            "KEY_COMPROMISE",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = aws_cmd(
        &cred,
        &[
            "revoke-certificate",
            "--certificate-authority-arn",
            &arn,
            "--certificate-serial",
            &serial,
            "--revocation-reason",
            "KEY_COMPROMISE",
        ],
    );
    assert!(
        !ok && out.contains("RequestAlreadyProcessedException"),
        "{out}"
    );
    let bad_csr = write(
        tmp.path(),
        "bad.csr",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    );
    let (ok, out) = aws_cmd(
        &cred,
        &[
            "issue-certificate",
            "--certificate-authority-arn",
            &arn,
            "--csr",
            &format!("fileb://{}", bad_csr.display()),
            "--signing-algorithm",
            "SHA256WITHECDSA",
            "--validity",
            "Value=1,Type=DAYS",
        ],
    );
    assert!(!ok && out.contains("MalformedCSRException"), "{out}");
}

#[test]
fn cli_external_root_signed_by_openssl() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let d = dir.to_str().unwrap();
    let out = ca(&[
        "init",
        "--dir",
        d,
        "--trust-domain",
        "mesh.local",
        "--external-root",
    ]);
    assert!(out.contains("intermediate.csr"), "{out}");
    let (ok, out) = run(Command::new(BIN).args([
        "issue",
        "--dir",
        d,
        "--service",
        "a",
        "--namespace",
        "n",
        "--out",
        "/dev/null/x",
    ]));
    assert!(!ok && out.contains("install-intermediate"), "{out}");
    // The "elsewhere" root: openssl.
    let rk = tmp.path().join("ext-root.key");
    let rc = tmp.path().join("ext-root.crt");
    let (ok, out) = run(Command::new(&openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=Corp Root",
        ])
        .args([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
        .arg("-keyout")
        .arg(&rk)
        .arg("-out")
        .arg(&rc));
    assert!(ok, "{out}");
    let ext = write(
        tmp.path(),
        "ext.cnf",
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    );
    let ic = tmp.path().join("inter.crt");
    let (ok, out) = run(Command::new(&openssl)
        .args(["x509", "-req", "-days", "30", "-in"])
        .arg(dir.join("intermediate.csr"))
        .arg("-CA")
        .arg(&rc)
        .arg("-CAkey")
        .arg(&rk)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&ic));
    assert!(ok, "{out}");
    // A certificate for a different key is refused.
    let (ok, out) = run(Command::new(BIN)
        .args(["install-intermediate", "--dir", d])
        .arg(&rc)
        .arg("--root")
        .arg(&rc));
    assert!(
        !ok && (out.contains("does not match") || out.contains("not the key")),
        "{out}"
    );
    // Chain file form: intermediate + root in one file.
    let chain = write(
        tmp.path(),
        "chain.pem",
        &(std::fs::read_to_string(&ic).unwrap() + &std::fs::read_to_string(&rc).unwrap()),
    );
    ca(&["install-intermediate", "--dir", d, chain.to_str().unwrap()]);
    let prefix = tmp.path().join("svc.v1");
    ca(&[
        "issue",
        "--dir",
        d,
        "--service",
        "a",
        "--namespace",
        "n",
        "--out",
        prefix.to_str().unwrap(),
    ]);
    let crt = tmp.path().join("svc.v1.crt");
    let (ok, out) = run(Command::new(&openssl)
        .arg("verify")
        .arg("-CAfile")
        .arg(&rc)
        .arg("-untrusted")
        .arg(&crt)
        .arg(&crt));
    assert!(ok, "{out}");
}

/// `serve --tls`: curl verifies the API against the CA's root.crt (and refuses without it), and a
/// workload bootstraps its identity over HTTPS with the root pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_tls_verified_against_the_root() {
    let Some(curl) = tool("curl") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let d = dir.to_str().unwrap().to_owned();
    ca(&["init", "--dir", &d, "--trust-domain", "mesh.local"]);
    let cred: serde_json::Value = serde_json::from_str(&ca(&[
        "token",
        "create",
        "--dir",
        &d,
        "--namespace",
        "my-app",
        "--service",
        "api",
    ]))
    .unwrap();
    let (_server, url, _arn) = serve_with(&d, &["--tls"]);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let root = dir.join("root.crt");
    let (ok, out) = run(Command::new(&curl)
        .args(["-sS", "--cacert"])
        .arg(&root)
        .arg(format!("{url}/v1/ca/roots")));
    assert!(ok && out.contains("BEGIN CERTIFICATE"), "{out}");
    let (ok, out) = run(Command::new(&curl).args(["-sS", &format!("{url}/v1/ca/roots")]));
    assert!(!ok, "curl trusted the API without the root: {out}");

    let roots = trellis_ca::parse_certs(&std::fs::read_to_string(&root).unwrap()).unwrap();
    let id = trellis_ca::Identity::bootstrap(
        &url,
        cred["token"].as_str().unwrap(),
        "mesh.local".parse().unwrap(),
        None,
        Some(roots),
    )
    .await
    .unwrap();
    assert_eq!(
        id.spiffe_id().to_string(),
        "spiffe://mesh.local/ns/my-app/svc/api"
    );
}
