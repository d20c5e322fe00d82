//! Real etcd members (`/usr/bin/etcd` from Debian's `etcd-server`) on loopback ports with temporary
//! data directories, killed and removed on drop. Members can be killed and restarted by index.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a member (or the cluster) may take to answer `/health`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

/// An etcd cluster of real members on loopback.
pub struct EtcdCluster {
    binary: PathBuf,
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
    tls: Option<Tls>,
}

/// Client-facing TLS of the members (peers stay plain on loopback): PEM files.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA that signed `cert` and the clients' certificates (clients must present one).
    pub ca: PathBuf,
    /// Server certificate with an IP SAN 127.0.0.1, and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A client certificate and key signed by `ca` (used for the health probe).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Distinct free loopback ports: all bound at once, then released for etcd to take.
fn free_ports(n: usize) -> std::io::Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    listeners.iter().map(TcpListener::local_addr).collect()
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster has a leader. `None` (after printing why)
    /// when etcd is not installed and CI does not require it.
    pub fn start(n: usize) -> Option<EtcdCluster> {
        Self::start_with(n, None)
    }

    /// As [`EtcdCluster::start`], serving clients over TLS with client certificates required.
    pub fn start_with(n: usize, tls: Option<Tls>) -> Option<EtcdCluster> {
        let binary = crate::tools::require("etcd", "HA tests run real etcd members")?;
        let ports = free_ports(2 * n).ok()?;
        let unique = format!(
            "trellis-etcd-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ (ports[0].port() as u128)
        );
        let dir = std::env::temp_dir().join(&unique);
        std::fs::create_dir_all(&dir).ok()?;
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ports[2 * i],
                peer: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            binary,
            dir,
            token: unique,
            members,
            tls,
        };
        for i in 0..n {
            cluster.start_member(i);
        }
        cluster.wait_ready(0..n);
        Some(cluster)
    }

    /// Client URLs, comma-separated (the `--etcd-endpoints` value).
    pub fn endpoints(&self) -> String {
        let scheme = self.scheme();
        self.members
            .iter()
            .map(|m| format!("{scheme}://{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.members[i].client
    }

    /// SIGKILL member `i` (its data directory stays for a restart).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts member `i` from its data directory and waits until it answers.
    pub fn restart(&mut self, i: usize) {
        self.start_member(i);
    }

    /// Waits until every running member in `which` reports healthy (it has a leader).
    pub fn wait_ready(&self, which: impl IntoIterator<Item = usize>) {
        for i in which {
            let deadline = Instant::now() + READY_TIMEOUT;
            while !healthy(self.members[i].client, self.tls.as_ref()) {
                assert!(
                    Instant::now() < deadline,
                    "etcd member {i} not healthy within {READY_TIMEOUT:?}; logs in {}",
                    self.dir.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn start_member(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let scheme = self.scheme();
        let m = &self.members[i];
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).ok();
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.join(&m.name))
            .arg("--listen-client-urls")
            .arg(format!("{scheme}://{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("{scheme}://{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg("new")
            // Fast elections on loopback keep failure tests short.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        match log {
            Some(f) => cmd.stderr(f),
            None => cmd.stderr(Stdio::null()),
        };
        let child = cmd.spawn();
        assert!(child.is_ok(), "cannot start {}", self.binary.display());
        self.members[i].child = child.ok();
    }
}

impl EtcdCluster {
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET /health` says `"health":"true"` (a member with a leader).
fn healthy(addr: SocketAddr, tls: Option<&Tls>) -> bool {
    if let Some(tls) = tls {
        // Over TLS with a client certificate: curl does the handshake.
        return Command::new("curl")
            .args(["-s", "-m", "2", "--cacert"])
            .arg(&tls.ca)
            .arg("--cert")
            .arg(&tls.client_cert)
            .arg("--key")
            .arg(&tls.client_key)
            .arg(format!("https://{addr}/health"))
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\""));
    }
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nhost: etcd\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}
