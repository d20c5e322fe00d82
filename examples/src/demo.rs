//! The local demo mesh, in one process, on loopback: the control plane (discovery + CA), the demo
//! services `web`, `api` (v1, two instances), `api-canary` (v2) and `users`, each behind its own
//! sidecar with its own mTLS identity, and the internal load balancer (with its own sidecar, like an
//! App Mesh virtual gateway) routing `/api/*` 90/10 between `api` and `api-canary` and everything
//! else to `web`. Everything is registered through the Cloud Map API, as a user's tooling would.
//!
//! Request flow: client → LB → LB's sidecar ═mTLS═> web's sidecar → web → web's sidecar ═mTLS═>
//! api's sidecar → api → api's sidecar ═mTLS═> users' sidecar → users.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_ca::{CaDir, Policy, Scope};
use trellis_core::{NamespaceName, ServiceName, TrustDomain};
use trellis_discovery::{HealthConfig, Server, ServerConfig};
use trellis_proxy::lb::{LbConfig, LbHandle};

use crate::cloudmap::{CloudMap, CloudMapError};
use crate::demo_service::{DemoConfig, serve};

pub const NAMESPACE: &str = "my-app.local";
pub const TRUST_DOMAIN: &str = "mesh.local";

/// Where the demo listens; port 0 picks a free port (tests).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub api_listen: SocketAddr,
    pub dns_listen: SocketAddr,
    pub lb_listen: SocketAddr,
    /// State directory; a fresh temporary one when `None` (removed on shutdown).
    pub data_dir: Option<PathBuf>,
    /// Print progress lines to stderr.
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            api_listen: SocketAddr::from(([127, 0, 0, 1], 9400)),
            dns_listen: SocketAddr::from(([127, 0, 0, 1], 9053)),
            lb_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: None,
            progress: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    #[error("state directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA: {0}")]
    Ca(#[from] trellis_ca::CaError),
    #[error("control plane: {0}")]
    ControlPlane(#[from] trellis_discovery::ServerError),
    #[error("Cloud Map API: {0}")]
    CloudMap(#[from] CloudMapError),
    #[error(
        "{what}: cannot listen on {addr}: {source} (is another demo running? pass other ports)"
    )]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("sidecar of {instance}: {message}")]
    Sidecar { instance: String, message: String },
    #[error("load balancer: {0}")]
    Lb(String),
    #[error("{0} did not become ready within 20s")]
    NotReady(String),
}

/// One demo service instance and its sidecar.
pub struct Instance {
    pub id: String,
    pub service: String,
    pub version: String,
    pub app_addr: SocketAddr,
    pub sidecar: trellis_proxy::Running,
    stop_app: watch::Sender<bool>,
    stop_sidecar: CancellationToken,
}

impl Instance {
    pub fn inbound(&self) -> Option<SocketAddr> {
        self.sidecar.inbound_addr
    }
}

/// The running demo mesh.
pub struct Demo {
    pub control_plane: Server,
    pub instances: Vec<Instance>,
    pub lb: LbHandle,
    pub lb_sidecar: trellis_proxy::Running,
    pub lb_addr: SocketAddr,
    pub data_dir: PathBuf,
    temp_dir: bool,
    lb_stop: CancellationToken,
    lb_sidecar_stop: CancellationToken,
    cloudmap: CloudMap,
    /// How the control plane was started (bound addresses), for a restart.
    control_plane_config: ServerConfig,
    /// From the start until the mesh served its first request through the LB.
    ready_in: Duration,
}

/// One demo instance: what it is, whom it calls, who may call it.
pub struct Spec {
    pub service: &'static str,
    pub version: &'static str,
    pub id: &'static str,
    pub calls: &'static [&'static str],
    pub allowed: &'static [&'static str],
}

const fn spec(
    service: &'static str,
    version: &'static str,
    id: &'static str,
    calls: &'static [&'static str],
    allowed: &'static [&'static str],
) -> Spec {
    Spec {
        service,
        version,
        id,
        calls,
        allowed,
    }
}

/// Leaves first, so callers find their upstreams ready.
pub const TOPOLOGY: &[Spec] = &[
    spec("users", "v1", "users-1", &[], &["api", "api-canary"]),
    spec("api", "v1", "api-1", &["users"], &["web", "lb"]),
    spec("api", "v1", "api-2", &["users"], &["web", "lb"]),
    spec(
        "api-canary",
        "v2",
        "api-canary-1",
        &["users"],
        &["web", "lb"],
    ),
    spec("web", "v1", "web-1", &["api"], &["lb"]),
];

struct Progress {
    on: bool,
    step: usize,
    total: usize,
    started: Instant,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.step += 1;
        if self.on {
            eprintln!(
                "[{}/{}] {what} ({} ms)",
                self.step,
                self.total,
                self.started.elapsed().as_millis()
            );
        }
    }
}

/// Starts the whole mesh and waits until every sidecar is ready and every instance is healthy.
pub async fn start(opts: DemoOptions) -> Result<Demo, DemoError> {
    let mut progress = Progress {
        on: opts.progress,
        step: 0,
        total: 7,
        started: Instant::now(),
    };
    let (data_dir, temp_dir) = match &opts.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&data_dir).map_err(|source| DemoError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let namespace: NamespaceName = parse(NAMESPACE);
    let trust_domain: TrustDomain = parse(TRUST_DOMAIN);

    // 1. The CA, and one scoped join token per workload (the LB's sidecar included). Tokens are
    //    created before the control plane opens the CA, as an operator would with `trellis-ca token`.
    progress.step("private CA: root + intermediate, scoped join tokens");
    let ca_dir = CaDir::new(data_dir.join("ca"));
    if !ca_dir.exists() {
        ca_dir.init(trust_domain.clone(), Policy::default())?;
    }
    let tokens = ca_dir.tokens()?;
    let mut token_of = BTreeMap::new();
    for service in ["users", "api", "api-canary", "web", "lb"] {
        let t = tokens.create(Scope::Workload {
            namespace: namespace.clone(),
            service: parse::<ServiceName>(service),
        })?;
        token_of.insert(service, t.bearer());
    }
    drop(tokens);

    // 2. The control plane: Cloud Map API + watch API + CA on one port, DNS, health checks.
    progress.step("control plane: Cloud Map API, watch API, CA, DNS, health checks");
    let mut cfg = ServerConfig::new(opts.api_listen);
    cfg.dns_listen = Some(opts.dns_listen);
    cfg.data_dir = Some(data_dir.clone());
    cfg.trust_domain = trust_domain.clone();
    cfg.health = HealthConfig {
        interval: Duration::from_millis(500),
        timeout: Duration::from_millis(400),
        ..HealthConfig::default()
    };
    let control_plane = Server::start(cfg.clone()).await?;
    let api = control_plane.api_addr;
    cfg.api_listen = api;
    cfg.dns_listen = control_plane.dns_addr;
    let control_plane_config = cfg;
    let cloudmap = CloudMap::new(api);

    // 3. Namespace and services through the Cloud Map API.
    progress.step("Cloud Map: namespace my-app.local, services users, api, api-canary, web");
    let ns_id = cloudmap.create_dns_namespace(NAMESPACE).await?;
    let mut service_ids = BTreeMap::new();
    for service in ["users", "api", "api-canary", "web"] {
        service_ids.insert(service, cloudmap.create_service(&ns_id, service).await?);
    }

    // 4. Apps and sidecars, leaves first so callers find their upstreams ready.
    progress
        .step("services + sidecars: users, api ×2, api-canary, web (mTLS identities from the CA)");
    let mut instances = Vec::new();
    for Spec {
        service,
        version,
        id,
        calls,
        allowed,
    } in TOPOLOGY
    {
        let app_listener =
            bind(&format!("app {id}"), SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let app_addr = app_listener
            .local_addr()
            .map_err(|source| DemoError::Bind {
                what: format!("app {id}"),
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                source,
            })?;
        let toml = sidecar_toml(
            service,
            api,
            &token_of[service],
            Some((app_addr, allowed)),
            calls,
            &SidecarPorts::default(),
        );
        let stop_sidecar = CancellationToken::new();
        let sidecar = start_sidecar(id, &toml, stop_sidecar.clone()).await?;
        let app_calls = calls
            .iter()
            .filter_map(|c| {
                let addr = sidecar.upstream_addrs.get(*c)?;
                Some(((*c).to_owned(), format!("http://{addr}/")))
            })
            .collect();
        let (stop_app, stop_rx) = watch::channel(false);
        let app = DemoConfig {
            service: (*service).to_owned(),
            version: (*version).to_owned(),
            instance: (*id).to_owned(),
            calls: app_calls,
        };
        tokio::spawn(serve(app_listener, app, stop_rx));
        instances.push(Instance {
            id: (*id).to_owned(),
            service: (*service).to_owned(),
            version: (*version).to_owned(),
            app_addr,
            sidecar,
            stop_app,
            stop_sidecar,
        });
    }

    // 5. Register every instance at its sidecar's mTLS inbound address.
    progress.step("Cloud Map: RegisterInstance for every sidecar's inbound address");
    for inst in &instances {
        if let Some(inbound) = inst.inbound() {
            cloudmap
                .register(
                    &service_ids[inst.service.as_str()],
                    &inst.id,
                    inbound,
                    &[("version", inst.version.as_str())],
                )
                .await?;
        }
    }

    // 6. The LB's own sidecar (no inbound) and the LB in front of it.
    progress.step("internal load balancer: /api/* 90% api / 10% api-canary, rest → web");
    let lb_sidecar_stop = CancellationToken::new();
    let lb_sidecar = start_sidecar(
        "lb",
        &sidecar_toml(
            "lb",
            api,
            &token_of["lb"],
            None,
            &["web", "api", "api-canary"],
            &SidecarPorts::default(),
        ),
        lb_sidecar_stop.clone(),
    )
    .await?;
    let lb_config = lb_toml(
        opts.lb_listen,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &lb_sidecar.upstream_addrs,
    );
    let lb_config = LbConfig::from_str(&lb_config).map_err(|e| DemoError::Lb(e.to_string()))?;
    let lb_stop = CancellationToken::new();
    let lb = trellis_proxy::lb::start(lb_config, lb_stop.clone())
        .await
        .map_err(|e| DemoError::Lb(e.to_string()))?;
    let lb_addr = lb
        .listener("public")
        .ok_or_else(|| DemoError::Lb("listener `public` did not start".into()))?;

    // 7. Wait until the mesh serves: every sidecar ready, every instance healthy, the LB answering.
    progress
        .step("waiting for sidecars /ready, health checks, and the first request through the LB");
    let mut demo = Demo {
        control_plane,
        instances,
        lb,
        lb_sidecar,
        lb_addr,
        data_dir,
        temp_dir,
        lb_stop,
        lb_sidecar_stop,
        cloudmap,
        control_plane_config,
        ready_in: Duration::ZERO,
    };
    demo.wait_ready().await?;
    demo.ready_in = progress.started.elapsed();
    Ok(demo)
}

impl Demo {
    async fn wait_ready(&mut self) -> Result<(), DemoError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut admins: Vec<(String, SocketAddr)> = self
            .instances
            .iter()
            .map(|i| (format!("sidecar of {}", i.id), i.sidecar.admin_addr))
            .collect();
        admins.push(("sidecar of lb".into(), self.lb_sidecar.admin_addr));
        for (what, admin) in admins {
            while http_get(admin, "/ready").await.map(|(s, _)| s) != Some(200) {
                if Instant::now() > deadline {
                    return Err(DemoError::NotReady(what));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for service in ["users", "api", "api-canary", "web"] {
            let want = self
                .instances
                .iter()
                .filter(|i| i.service == service)
                .count();
            loop {
                let healthy = self
                    .cloudmap
                    .healthy_instances(NAMESPACE, service)
                    .await?
                    .len();
                if healthy >= want {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(DemoError::NotReady(format!("health of {service}")));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        loop {
            if let Some((200, _)) = http_get(self.lb_addr, "/").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DemoError::NotReady("the load balancer".into()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.control_plane.api_addr
    }

    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.control_plane.dns_addr
    }

    pub fn cloudmap(&self) -> &CloudMap {
        &self.cloudmap
    }

    /// Stops one instance abruptly (app and sidecar), as a crashed task would. Nothing is
    /// deregistered: the health checks must notice.
    pub fn kill(&mut self, id: &str) -> Option<Instance> {
        let i = self.instances.iter().position(|i| i.id == id)?;
        let inst = self.instances.remove(i);
        let _ = inst.stop_app.send(true);
        inst.stop_sidecar.cancel();
        Some(inst)
    }

    /// Stops the control plane and starts it again on the same addresses and state, as an
    /// operator's restart: sidecars keep serving from their last endpoint sets and re-watch.
    pub async fn restart_control_plane(&mut self) -> Result<(), DemoError> {
        // A stand-in keeps the field valid while the real one is down.
        let stand_in =
            Server::start(ServerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)))).await?;
        let old = std::mem::replace(&mut self.control_plane, stand_in);
        old.shutdown().await;
        let mut started = Server::start(self.control_plane_config.clone()).await;
        for _ in 0..50 {
            if started.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            started = Server::start(self.control_plane_config.clone()).await;
        }
        let stand_in = std::mem::replace(&mut self.control_plane, started?);
        stand_in.shutdown().await;
        Ok(())
    }

    /// What the banner shows: every URL a user would try.
    pub fn banner(&self) -> String {
        let api = self.api_addr();
        let dns = self.dns_addr();
        let mut s = String::new();
        s.push_str(&format!(
            "\ntrellis demo mesh is up ({} ms).\n\n",
            self.ready_in.as_millis()
        ));
        s.push_str(&format!(
            "  load balancer     http://{}/  (/api/* → api 90% / api-canary 10%)\n",
            self.lb_addr
        ));
        s.push_str(&format!(
            "  control plane     http://{api}  (Cloud Map API, watch API, CA)\n"
        ));
        if let Some(dns) = dns {
            s.push_str(&format!(
                "  DNS               {dns} (udp+tcp), zone {NAMESPACE}\n"
            ));
        }
        s.push_str(&format!("  metrics           http://{api}/metrics\n"));
        for i in &self.instances {
            s.push_str(&format!(
                "  {:<17} admin http://{}/ (metrics, ready, clusters), mTLS inbound {}\n",
                i.id,
                i.sidecar.admin_addr,
                i.inbound().map(|a| a.to_string()).unwrap_or_default()
            ));
        }
        s.push_str(&format!(
            "  lb sidecar        admin http://{}/\n",
            self.lb_sidecar.admin_addr
        ));
        s.push_str(&format!(
            "  lb admin          http://{}/metrics\n\n",
            self.lb.admin
        ));
        s.push_str("Try:\n");
        s.push_str(&format!(
            "  curl -s http://{}/                      # web → api → users, over mTLS\n",
            self.lb_addr
        ));
        s.push_str(&format!("  for i in $(seq 20); do curl -s http://{}/api/x | grep -o '\"version\":\"v[12]\"'; done\n", self.lb_addr));
        if let Some(dns) = dns {
            s.push_str(&format!(
                "  dig @{} -p {} api.{NAMESPACE} +short\n",
                dns.ip(),
                dns.port()
            ));
            s.push_str(&format!(
                "  dig @{} -p {} SRV api.{NAMESPACE} +short\n",
                dns.ip(),
                dns.port()
            ));
        }
        s.push_str(&format!(
            "  AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x aws servicediscovery discover-instances \\\n      --endpoint-url http://{api} --region us-east-1 --namespace-name {NAMESPACE} --service-name api\n"
        ));
        s.push_str(&format!(
            "  curl -s http://{api}/v1/watch/{NAMESPACE}/api\n"
        ));
        s.push_str("\nCtrl-C stops everything.\n");
        s
    }

    /// Stops everything: the LB, then sidecars and apps, then the control plane.
    pub async fn shutdown(self) {
        self.lb_stop.cancel();
        self.lb.shutdown().await;
        self.lb_sidecar_stop.cancel();
        for i in &self.instances {
            i.stop_sidecar.cancel();
            let _ = i.stop_app.send(true);
        }
        self.control_plane.shutdown().await;
        if self.temp_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

fn parse<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    // The demo's names are constants checked by its tests; a failure here is a programming error.
    s.parse()
        .unwrap_or_else(|e| panic!("demo constant {s:?} is invalid: {e:?}"))
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, DemoError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DemoError::Bind {
            what: what.to_owned(),
            addr,
            source,
        })
}

/// Where a sidecar listens on 127.0.0.1: zero picks a free port (the in-process demo reads the
/// bound ports back; a sidecar in another process needs them chosen up front).
#[derive(Debug, Clone, Default)]
pub struct SidecarPorts {
    pub admin: u16,
    pub inbound: u16,
    /// Local port per upstream service (absent: 0).
    pub upstreams: BTreeMap<String, u16>,
}

/// The sidecar config of one workload: identity, control plane, optional inbound (in front of the
/// app, with intentions), and one local port per upstream it calls.
pub fn sidecar_toml(
    service: &str,
    control_plane: SocketAddr,
    token: &str,
    inbound: Option<(SocketAddr, &[&str])>,
    upstreams: &[&str],
    ports: &SidecarPorts,
) -> String {
    let admin = ports.admin;
    let mut s = format!(
        "[identity]\nnamespace = \"{NAMESPACE}\"\nservice = \"{service}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\n\
         [control_plane]\naddress = \"{control_plane}\"\ntoken = \"{token}\"\nwatch_wait = \"30s\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[runtime]\nworker_threads = 1\ndrain_timeout = \"2s\"\n\n"
    );
    if let Some((app, allowed)) = inbound {
        let rules: Vec<String> = allowed
            .iter()
            .map(|src| format!("{{ source = \"{src}\", action = \"allow\" }}"))
            .collect();
        s.push_str(&format!(
            "[inbound]\nlisten = \"127.0.0.1:{}\"\napp = \"{app}\"\nprotocol = \"http\"\n\n\
             [inbound.intentions]\ndefault = \"deny\"\nrules = [{}]\n\n",
            ports.inbound,
            rules.join(", ")
        ));
    }
    let ups: Vec<String> = upstreams
        .iter()
        .map(|u| {
            let port = ports.upstreams.get(*u).copied().unwrap_or(0);
            format!("{{ service = \"{u}\", local_port = {port} }}")
        })
        .collect();
    s.push_str(&format!("[outbound]\nupstreams = [{}]\n", ups.join(", ")));
    s
}

async fn start_sidecar(
    id: &str,
    toml: &str,
    stop: CancellationToken,
) -> Result<trellis_proxy::Running, DemoError> {
    let err = |message: String| DemoError::Sidecar {
        instance: id.to_owned(),
        message,
    };
    let config = trellis_proxy::Config::from_toml(toml).map_err(|e| err(e.to_string()))?;
    trellis_proxy::start(config, stop)
        .await
        .map_err(|e| err(e.to_string()))
}

/// The LB: one public listener; `/api/*` split 90/10, everything else to `web`. Each target group
/// is the LB sidecar's local port for that service (the sidecar adds mTLS and balancing).
pub fn lb_toml(
    listen: SocketAddr,
    admin: SocketAddr,
    ports: &BTreeMap<String, SocketAddr>,
) -> String {
    let target = |svc: &str| {
        ports
            .get(svc)
            .map(|a| a.to_string())
            .unwrap_or_else(|| "127.0.0.1:9".into())
    };
    format!(
        r#"[admin]
listen = "{admin}"

[[target_group]]
name = "web"
targets = ["{web}"]
health_check = {{ path = "/health", interval = "1s", timeout = "1s", healthy_threshold = 1, unhealthy_threshold = 2, matcher = "200-399" }}

[[target_group]]
name = "api"
targets = ["{api}"]
health_check = {{ path = "/health", interval = "1s", timeout = "1s", healthy_threshold = 1, unhealthy_threshold = 2, matcher = "200-399" }}

[[target_group]]
name = "api-canary"
targets = ["{canary}"]
health_check = {{ path = "/health", interval = "1s", timeout = "1s", healthy_threshold = 1, unhealthy_threshold = 2, matcher = "200-399" }}

[[listener]]
name = "public"
listen = "{listen}"
protocol = "http"
default_action = {{ type = "forward", target_groups = [{{ name = "web" }}] }}

[[listener.rule]]
name = "api"
priority = 10
conditions = [{{ field = "path-pattern", values = ["/api/*"] }}]
action = {{ type = "forward", target_groups = [{{ name = "api", weight = 90 }}, {{ name = "api-canary", weight = 10 }}] }}
"#,
        web = target("web"),
        api = target("api"),
        canary = target("api-canary"),
    )
}

/// A GET on a fresh connection; (status, body), or None when the connection failed.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}
