//! Certificate issuance benchmark: in-process CSR→cert on one core, over the HTTP API, and
//! `openssl x509 -req` per certificate as the peer baseline — same run, ratios printed.
//! Run via `bench/ca/run.sh` (release build).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use trellis_ca::api::{CaApi, serve};
use trellis_ca::{Authority, CaDir, Policy, Scope, VerifiedCsr, generate_key_and_csr};
use trellis_core::SpiffeId;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = arg("--n", 4000);
    let http_n = arg("--http-n", 4000);
    let conc = arg("--concurrency", 32);
    let openssl_n = arg("--openssl-n", 200);
    let id: SpiffeId = "spiffe://mesh.local/ns/bench/svc/api".parse()?;
    eprintln!("generating {n} CSRs...");
    let csrs: Vec<String> = (0..n.max(http_n))
        .map(|_| generate_key_and_csr().map(|(_, c)| c))
        .collect::<Result<_, _>>()?;

    // 1. In-process, one core (this thread only): CSR parse + signature check + sign.
    let mem = Authority::in_memory("mesh.local".parse()?, Policy::default())?;
    let start = Instant::now();
    let cpu0 = thread_cpu_seconds();
    for c in &csrs[..n] {
        let v = VerifiedCsr::parse(c.as_bytes())?;
        mem.issue(&v, &id, None, false, "bench")?;
    }
    let inproc = n as f64 / start.elapsed().as_secs_f64();
    // Per CPU-second of this thread: robust when other processes share the cores.
    let inproc_cpu = match (cpu0, thread_cpu_seconds()) {
        (Some(a), Some(b)) if b > a => n as f64 / (b - a),
        _ => f64::NAN,
    };

    // 1b. Same, file-backed CA (index + audit fsynced per certificate).
    let tmp_path = std::env::temp_dir().join(format!("trellis-ca-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp_path)?;
    let dir = CaDir::new(tmp_path.join("ca"));
    let disk = dir.init("mesh.local".parse()?, Policy::default())?;
    let m = n.min(1000);
    let start = Instant::now();
    for c in &csrs[..m] {
        let v = VerifiedCsr::parse(c.as_bytes())?;
        disk.issue(&v, &id, None, false, "bench")?;
    }
    let inproc_disk = m as f64 / start.elapsed().as_secs_f64();

    // 2. Over HTTP (file-backed CA, loopback, keep-alive clients).
    let rt = tokio::runtime::Runtime::new()?;
    let http_rate = rt.block_on(async {
        let api = CaApi::new(disk.clone(), dir.tokens()?, "us-east-1");
        let token = api.tokens().create(Scope::Workload {
            namespace: "bench".parse()?,
            service: "api".parse()?,
        })?;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1/ca/sign", l.local_addr()?);
        tokio::spawn(serve(l, None, api, std::future::pending()));
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let auth = format!("Bearer {}", token.bearer());
        let work: Vec<String> = csrs[..http_n].to_vec();
        let chunks: Vec<Vec<String>> = work
            .chunks(http_n.div_ceil(conc))
            .map(|c| c.to_vec())
            .collect();
        let start = Instant::now();
        let tasks: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let client = client.clone();
                let url = url.clone();
                let auth = auth.clone();
                tokio::spawn(async move {
                    for c in chunk {
                        let req = http::Request::post(&url)
                            .header("authorization", &auth)
                            .body(Full::new(Bytes::from(c)))?;
                        let resp = client.request(req).await?;
                        let ok = resp.status().is_success();
                        let _ = resp.into_body().collect().await?;
                        if !ok {
                            return Err::<(), Box<dyn std::error::Error + Send + Sync>>(
                                "sign failed".into(),
                            );
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for t in tasks {
            t.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        Ok::<f64, Box<dyn std::error::Error>>(http_n as f64 / start.elapsed().as_secs_f64())
    })?;

    // 3. openssl x509 -req per certificate, signing with the same intermediate key.
    let openssl_rate = openssl_baseline(dir.path(), &csrs[..openssl_n.min(csrs.len())], &tmp_path)?;
    let _ = std::fs::remove_dir_all(&tmp_path);

    println!(
        "trellis-ca issuance benchmark ({} cores available)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "  in-process, 1 core, in-memory CA : {inproc:>9.0} certs/s   (target >= 4000)  ratio vs openssl {:.1}x",
        inproc / openssl_rate
    );
    println!(
        "  in-process, per thread CPU-second: {inproc_cpu:>9.0} certs/s   (same work, excluding time the core ran other processes)"
    );
    println!("  in-process, 1 core, fsynced CA   : {inproc_disk:>9.0} certs/s");
    println!(
        "  HTTP API, {conc} clients, fsynced  : {http_rate:>9.0} certs/s   (target >= 1500)  ratio vs openssl {:.1}x",
        http_rate / openssl_rate
    );
    println!(
        "  openssl x509 -req per cert       : {openssl_rate:>9.0} certs/s   (baseline, process per cert)"
    );
    // One machine-readable line for trellis-bench's control-plane scenario.
    let inproc_cpu = if inproc_cpu.is_finite() {
        inproc_cpu
    } else {
        0.0
    };
    println!(
        "BENCHJSON {{\"inproc\":{inproc:.1},\"inproc_cpu\":{inproc_cpu:.1},\"inproc_disk\":{inproc_disk:.1},\"http\":{http_rate:.1},\"http_clients\":{conc},\"openssl\":{openssl_rate:.1}}}"
    );
    Ok(())
}

fn openssl_baseline(
    ca: &Path,
    csrs: &[String],
    tmp: &Path,
) -> Result<f64, Box<dyn std::error::Error>> {
    let ext = tmp.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=URI:spiffe://mesh.local/ns/bench/svc/api\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )?;
    let paths: Vec<_> = csrs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let p = tmp.join(format!("csr{i}.pem"));
            std::fs::write(&p, c).map(|()| p)
        })
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    for p in &paths {
        let st = Command::new("openssl")
            .args([
                "x509",
                "-req",
                "-days",
                "1",
                "-set_serial",
                "0x1234567890abcdef",
            ])
            .arg("-in")
            .arg(p)
            .arg("-CA")
            .arg(ca.join("intermediate.crt"))
            .arg("-CAkey")
            .arg(ca.join("intermediate.key"))
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(tmp.join("out.pem"))
            .stderr(std::process::Stdio::null())
            .status()?;
        if !st.success() {
            return Err("openssl x509 -req failed".into());
        }
    }
    Ok(paths.len() as f64 / start.elapsed().as_secs_f64())
}

/// This thread's user+system CPU time from /proc (10 ms resolution; fine over a ~1 s run).
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
