//! Health checks. Active HTTP/TCP checks for services with a `HealthCheckConfig`, TTL checks for
//! instances with a `TRELLIS_HEALTH_TTL` attribute (they heartbeat on
//! `POST /v1/heartbeat/<namespace>/<service>/<instance>`). Custom health arrives through the API.
//!
//! One task per checked instance on a fixed-rate schedule (`tokio::time::interval`: no drift),
//! phase-shifted by a random jitter so thousands of checks spread over the interval; a semaphore
//! bounds the checks in flight. A reconciler starts and stops tasks as instances come and go, and
//! (on etcd) as the live replica set changes: each replica runs only the checks it owns. A task
//! restarts when its service's check settings change (`health_settings.rs`: per-service interval,
//! timeout, thresholds and status matcher from tags, over the server-wide defaults).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use trellis_core::HealthStatus;

use crate::health_settings::CheckSettings;
use crate::metrics::Metrics;
use crate::model::{CheckType, attr};
use crate::registry::Registry;

#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Time between two active checks of one instance.
    pub interval: Duration,
    /// Time one check may take (connect + response head).
    pub timeout: Duration,
    /// Consecutive successes before an instance is healthy again.
    pub healthy_threshold: u32,
    /// Active checks in flight at once.
    pub concurrency: usize,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            healthy_threshold: 1,
            concurrency: 1024,
        }
    }
}

/// What to check for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    Active {
        kind: CheckType,
        target: SocketAddr,
        path: String,
        settings: CheckSettings,
    },
    Ttl(Duration),
}

type Key = (String, String);

pub struct HealthChecker {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    config: HealthConfig,
    permits: Arc<Semaphore>,
    tasks: HashMap<Key, (Check, JoinHandle<()>)>,
}

impl HealthChecker {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>, config: HealthConfig) -> Self {
        let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
        HealthChecker {
            registry,
            metrics,
            config,
            permits,
            tasks: HashMap::new(),
        }
    }

    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            self.reconcile();
            tokio::select! {
                _ = self.registry.topology.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => break,
            }
        }
        // Wait for the aborted checks to drop their registry handles: a server restarted in the
        // same process can then open the store again.
        for (_, (_, task)) in self.tasks.drain() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Starts tasks for new checks, stops those whose instance left or whose check changed.
    fn reconcile(&mut self) {
        let desired = desired_checks(&self.registry, &self.config);
        self.tasks.retain(|k, (check, task)| {
            let keep = desired.get(k) == Some(check) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, check) in desired {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let task = match &check {
                Check::Active { .. } => tokio::spawn(active(
                    self.registry.clone(),
                    self.metrics.clone(),
                    self.permits.clone(),
                    key.clone(),
                    check.clone(),
                )),
                Check::Ttl(ttl) => {
                    tokio::spawn(ttl_check(self.registry.clone(), key.clone(), *ttl))
                }
            };
            self.tasks.insert(key, (check, task));
        }
    }
}

fn desired_checks(reg: &Registry, defaults: &HealthConfig) -> HashMap<Key, Check> {
    let st = reg.read();
    let mut out = HashMap::new();
    for (sid, e) in &st.services {
        for (iid, i) in &e.instances {
            if !reg.owns_check(sid, iid) {
                continue;
            }
            let a = &i.instance.attributes;
            let key = (sid.clone(), iid.clone());
            if let Some(ttl) = a
                .get(attr::HEALTH_TTL)
                .and_then(|t| humantime::parse_duration(t).ok())
            {
                out.insert(key, Check::Ttl(ttl));
                continue;
            }
            let Some(hc) = &e.service.health_check_config else {
                continue;
            };
            let ip = a.get(attr::IPV4).or_else(|| a.get(attr::IPV6));
            let port = a
                .get(attr::PORT)
                .and_then(|p| p.parse::<u16>().ok())
                .unwrap_or(match hc.kind {
                    CheckType::Https => 443,
                    _ => 80,
                });
            let Some(ip) = ip.and_then(|ip| ip.parse().ok()) else {
                continue;
            };
            out.insert(
                key,
                Check::Active {
                    kind: hc.kind,
                    target: SocketAddr::new(ip, port),
                    path: hc.resource_path.clone().unwrap_or_else(|| "/".into()),
                    settings: CheckSettings::for_service(
                        defaults,
                        hc.failure_threshold.unwrap_or(1),
                        st.tags.get(&e.service.arn).map_or(&[], Vec::as_slice),
                    ),
                },
            );
        }
    }
    out
}

async fn active(
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    (service_id, instance_id): Key,
    check: Check,
) {
    let Check::Active {
        kind,
        target,
        path,
        settings,
    } = check
    else {
        return;
    };
    let jitter =
        rand::rng().random_range(Duration::ZERO..settings.interval.max(Duration::from_millis(1)));
    let mut ticks = tokio::time::interval_at(Instant::now() + jitter, settings.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut successes, mut failures) = (0u32, 0u32);
    let kind_label = match kind {
        CheckType::Http => "HTTP",
        CheckType::Https => "HTTPS",
        CheckType::Tcp => "TCP",
    };
    loop {
        ticks.tick().await;
        let Ok(_permit) = permits.acquire().await else {
            return;
        };
        let ok = match kind {
            CheckType::Http => http_check(target, &path, &settings).await,
            CheckType::Https => https_check(target, &path, &settings).await,
            CheckType::Tcp => tcp_check(target, settings.timeout).await,
        };
        metrics
            .health_checks
            .with_label_values(&[kind_label, if ok { "success" } else { "failure" }])
            .inc();
        if ok {
            successes += 1;
            failures = 0;
            if successes >= settings.healthy_threshold {
                registry.set_health(&service_id, &instance_id, HealthStatus::Healthy);
            }
        } else {
            failures += 1;
            successes = 0;
            if failures >= settings.unhealthy_threshold {
                registry.set_health(&service_id, &instance_id, HealthStatus::Unhealthy);
            }
        }
    }
}

async fn tcp_check(target: SocketAddr, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(s)) => {
            reset_on_close(&s);
            true
        }
        _ => false,
    }
}

/// Close check connections with RST (as HAProxy does): thousands of checks a second would
/// otherwise fill the ephemeral port range with TIME_WAIT sockets.
fn reset_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// `GET path` over HTTP/1.1; healthy when the status matches the service's matcher (by default
/// 2xx or 3xx, as Route 53).
async fn http_check(target: SocketAddr, path: &str, settings: &CheckSettings) -> bool {
    let attempt = async {
        let s = TcpStream::connect(target).await.ok()?;
        reset_on_close(&s);
        ask(s, target, path, settings).await
    };
    matches!(
        tokio::time::timeout(settings.timeout, attempt).await,
        Ok(Some(true))
    )
}

/// As Route 53's HTTPS checks: a TLS handshake (the certificate is not validated, see
/// `health_tls`), then the same request as [`http_check`], all within the timeout.
async fn https_check(target: SocketAddr, path: &str, settings: &CheckSettings) -> bool {
    let attempt = async {
        let tls = crate::health_tls::connector()?;
        let s = TcpStream::connect(target).await.ok()?;
        reset_on_close(&s);
        let name = tokio_rustls::rustls::pki_types::ServerName::IpAddress(target.ip().into());
        let s = tls.connect(name, s).await.ok()?;
        ask(s, target, path, settings).await
    };
    matches!(
        tokio::time::timeout(settings.timeout, attempt).await,
        Ok(Some(true))
    )
}

/// `GET path` on a fresh connection; whether the status matches.
async fn ask<IO>(
    mut s: IO,
    target: SocketAddr,
    path: &str,
    settings: &CheckSettings,
) -> Option<bool>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: trellis-health-check\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    s.flush().await.ok()?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s.read(&mut buf[n..]).await.ok()?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    let code: u16 = head.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()?;
    Some(settings.matcher.matches(code))
}

/// Unhealthy when no heartbeat arrived within `ttl` (counting from the task's start).
async fn ttl_check(registry: Arc<Registry>, (service_id, instance_id): Key, ttl: Duration) {
    let started = std::time::Instant::now();
    let poll = (ttl / 10).clamp(Duration::from_millis(5), Duration::from_secs(1));
    loop {
        tokio::time::sleep(poll).await;
        let last = {
            let st = registry.read();
            let Some(i) = st
                .services
                .get(&service_id)
                .and_then(|e| e.instances.get(&instance_id))
            else {
                return;
            };
            i.last_heartbeat
        };
        let since = last.unwrap_or(started);
        if since.elapsed() > ttl {
            registry.set_health(&service_id, &instance_id, HealthStatus::Unhealthy);
        }
    }
}
