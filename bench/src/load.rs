//! Load generators: wrk (HTTP/1.1), h2load (HTTP/2) and dnsperf (DNS), each parsed into a [`Sample`].

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{Ctx, Role};

/// One measured run of one subject.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Requests (or queries) per second.
    pub rate: f64,
    /// Latency percentiles in microseconds (0 when the tool does not report them).
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Failed requests: connect/read/write errors, timeouts and non-2xx/3xx answers.
    pub errors: u64,
    pub total: u64,
    /// CPU time of the subject per request, in microseconds (user + system, whole process tree).
    pub cpu_us_per_req: Option<f64>,
    /// The kernel's part of `cpu_us_per_req` (system time).
    #[serde(default)]
    pub sys_us_per_req: Option<f64>,
    /// Resident memory of the subject after the run, in KiB.
    pub rss_kib: Option<u64>,
    /// Bytes per second, for throughput scenarios.
    pub bytes_per_sec: Option<f64>,
    /// How busy the load generator's CPU was during the run (0–1), when processes are pinned:
    /// near 1, the load generator and origin set the pace, not the subject.
    #[serde(default)]
    pub load_cpu_busy: Option<f64>,
}

const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"errors\":%d,\"p50\":%d,\"p99\":%d,\"p999\":%d}\n",
    summary.requests, summary.duration, summary.bytes, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

#[derive(Deserialize)]
struct WrkJson {
    requests: u64,
    duration_us: u64,
    bytes: u64,
    errors: u64,
    p50: f64,
    p99: f64,
    p999: f64,
}

/// HTTP/1.1 load with wrk: `connections` keep-alive connections on one thread for `duration`.
/// `extra_headers` e.g. `["Connection: close"]` for a new connection per request.
pub fn wrk(
    ctx: &Ctx,
    url: &str,
    connections: usize,
    duration: Duration,
    extra_headers: &[&str],
) -> Result<Sample> {
    let script = ctx.work.join("wrk-report.lua");
    std::fs::write(&script, WRK_SCRIPT)?;
    let mut cmd = taskset(ctx, "wrk");
    cmd.args(["-t1", "-c", &connections.to_string()])
        .args(["-d", &format!("{}s", duration.as_secs().max(1))])
        .args(["--timeout", "5s", "-s"])
        .arg(&script);
    for h in extra_headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url);
    let out = cmd.output().context("running wrk")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().find_map(|l| l.strip_prefix("WRKJSON ")) else {
        bail!(
            "wrk printed no report (exit {}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let j: WrkJson = serde_json::from_str(line).context("parsing wrk report")?;
    let secs = j.duration_us as f64 / 1e6;
    Ok(Sample {
        rate: j.requests as f64 / secs,
        p50_us: j.p50,
        p99_us: j.p99,
        p999_us: j.p999,
        errors: j.errors,
        total: j.requests,
        bytes_per_sec: Some(j.bytes as f64 / secs),
        ..Sample::default()
    })
}

/// HTTP/2 load with h2load: `clients` connections, `streams` concurrent streams each.
pub fn h2load(
    ctx: &Ctx,
    url: &str,
    clients: usize,
    streams: usize,
    duration: Duration,
) -> Result<Sample> {
    let mut cmd = taskset(ctx, "h2load");
    cmd.args([
        "-t1",
        "-c",
        &clients.to_string(),
        "-m",
        &streams.to_string(),
    ])
    .args(["-D", &format!("{}", duration.as_secs().max(1))])
    .args(["--warm-up-time", "1"])
    .arg(url);
    let out = cmd.output().context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_h2load(&text).with_context(|| format!("parsing h2load output:\n{text}"))
}

/// Exactly `requests` HTTP/1.1 keep-alive requests over `clients` connections (h2load `--h1 -n`),
/// for counting instructions on a fixed amount of work.
pub fn h1_fixed(ctx: &Ctx, url: &str, clients: usize, requests: u64) -> Result<Sample> {
    let mut cmd = taskset(ctx, "h2load");
    cmd.args(["--h1", "-t1", "-c", &clients.to_string()])
        .args(["-n", &requests.to_string()])
        .arg(url);
    let out = cmd.output().context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_h2load(&text).with_context(|| format!("parsing h2load output:\n{text}"))
}

fn parse_h2load(text: &str) -> Result<Sample> {
    let mut s = Sample::default();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("finished in") {
            // "finished in 5.00s, 41234.20 req/s, 1.23MB/s"
            let rate = rest
                .split(',')
                .nth(1)
                .and_then(|p| p.trim().strip_suffix(" req/s"))
                .context("req/s")?;
            s.rate = rate.trim().parse()?;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            // "requests: 206171 total, 206171 started, 206171 done, 206171 succeeded, 0 failed, 0 errored, 0 timeout"
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                if let (Some(n), Some(word)) = (it.next(), it.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match word {
                        "total" => s.total = n,
                        "failed" | "errored" | "timeout" => s.errors += n,
                        _ => {}
                    }
                }
            }
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            // "time for request:   123us   4.56ms   789us   12us   95.2%" (min max mean sd)
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if let Some(mean) = fields.get(2) {
                s.p50_us = parse_h2_time(mean).unwrap_or(0.0);
            }
            if let Some(max) = fields.get(1) {
                s.p999_us = parse_h2_time(max).unwrap_or(0.0);
            }
        }
    }
    if s.rate == 0.0 {
        bail!("no req/s line");
    }
    Ok(s)
}

fn parse_h2_time(t: &str) -> Option<f64> {
    if let Some(v) = t.strip_suffix("us") {
        v.parse().ok()
    } else if let Some(v) = t.strip_suffix("ms") {
        v.parse::<f64>().ok().map(|v| v * 1e3)
    } else if let Some(v) = t.strip_suffix('s') {
        v.parse::<f64>().ok().map(|v| v * 1e6)
    } else {
        None
    }
}

/// DNS load with dnsperf over UDP from a query file, `clients` simulated clients.
pub fn dnsperf(
    ctx: &Ctx,
    server: std::net::SocketAddr,
    queries: &std::path::Path,
    duration: Duration,
) -> Result<Sample> {
    let mut cmd = taskset(ctx, "dnsperf");
    cmd.args([
        "-s",
        &server.ip().to_string(),
        "-p",
        &server.port().to_string(),
    ])
    .arg("-d")
    .arg(queries)
    .args([
        "-l",
        &format!("{}", duration.as_secs().max(1)),
        "-c",
        "4",
        "-Q",
        "1000000",
        "-q",
        "200",
    ]);
    let out = cmd.output().context("running dnsperf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut s = Sample::default();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Queries per second:") {
            s.rate = rest.trim().parse().unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("Queries completed:") {
            s.total = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Queries lost:") {
            s.errors = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Average Latency (s):") {
            s.p50_us = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0)
                * 1e6;
        }
    }
    if s.rate == 0.0 {
        bail!(
            "dnsperf printed no rate:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(s)
}

fn taskset(ctx: &Ctx, program: &str) -> Command {
    match ctx.cpu_for(Role::Load) {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu, program]);
            c
        }
        None => Command::new(program),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load() {
        let text = "finished in 5.00s, 41234.20 req/s, 1.23MB/s\n\
            requests: 206171 total, 206171 started, 206171 done, 206100 succeeded, 71 failed, 0 errored, 0 timeout\n\
            time for request:      123us      4.56ms       789us       12us    95.20%\n";
        let s = parse_h2load(text).unwrap();
        assert_eq!(s.rate, 41234.20);
        assert_eq!(s.total, 206171);
        assert_eq!(s.errors, 71);
        assert_eq!(s.p50_us, 789.0);
        assert_eq!(s.p999_us, 4560.0);
    }
}
