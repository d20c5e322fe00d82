//! Transparent interception (`trellis-proxy init-iptables`), like App Mesh's `proxyConfiguration`:
//! in the app's network namespace, `nat` rules send the app's outbound TCP to the sidecar's egress
//! listener, which routes each connection by its original destination (`SO_ORIGINAL_DST`, see
//! `egress.rs`). The sidecar's own traffic (its uid) and loopback destinations
//! are left alone, so the sidecar can still reach the app and its upstreams.
//!
//! All rules live in one chain ([`CHAIN`]) jumped to from `OUTPUT`, so removal is exact and
//! installing twice replaces the first set instead of stacking duplicates.

use std::process::Command;

use ipnet::Ipv4Net;

/// The chain holding every interception rule.
pub const CHAIN: &str = "TRELLIS_OUTPUT";

/// What to intercept and where to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptConfig {
    /// The sidecar's uid: its traffic is never redirected.
    pub proxy_uid: u32,
    /// The sidecar's egress listener port on this host.
    pub egress_port: u16,
    /// Destination ports to intercept; empty means every TCP port.
    pub ports: Vec<u16>,
    /// Destinations never intercepted (besides loopback), e.g. the control plane's network.
    pub exclude: Vec<Ipv4Net>,
}

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// One `iptables` invocation (arguments after the program name).
pub type Rule = Vec<String>;

fn rule(parts: &[&str]) -> Rule {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

/// The commands that install the rules (after [`remove_rules`] cleared any earlier set).
pub fn install_rules(c: &InterceptConfig) -> Vec<Rule> {
    let mut out = vec![rule(&["-t", "nat", "-N", CHAIN])];
    let uid = c.proxy_uid.to_string();
    out.push(rule(&[
        "-t",
        "nat",
        "-A",
        CHAIN,
        "-m",
        "owner",
        "--uid-owner",
        &uid,
        "-j",
        "RETURN",
    ]));
    let mut excluded = vec!["127.0.0.0/8".to_owned()];
    excluded.extend(c.exclude.iter().map(ToString::to_string));
    for net in &excluded {
        out.push(rule(&["-t", "nat", "-A", CHAIN, "-d", net, "-j", "RETURN"]));
    }
    let to = c.egress_port.to_string();
    let redirect = |extra: &[&str]| {
        let mut r = rule(&["-t", "nat", "-A", CHAIN, "-p", "tcp"]);
        r.extend(extra.iter().map(|s| (*s).to_owned()));
        r.extend(rule(&["-j", "REDIRECT", "--to-ports", &to]));
        r
    };
    if c.ports.is_empty() {
        out.push(redirect(&[]));
    } else {
        for p in &c.ports {
            out.push(redirect(&["--dport", &p.to_string()]));
        }
    }
    out.push(rule(&[
        "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", CHAIN,
    ]));
    out
}

/// The commands that remove the rules; each may fail harmlessly when nothing is installed.
pub fn remove_rules() -> Vec<Rule> {
    vec![
        rule(&["-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", CHAIN]),
        rule(&["-t", "nat", "-F", CHAIN]),
        rule(&["-t", "nat", "-X", CHAIN]),
    ]
}

fn run(program: &str, r: &Rule) -> Result<(), InterceptError> {
    let out = Command::new(program)
        .args(r)
        .output()
        .map_err(|source| InterceptError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InterceptError::Failed {
            command: format!("{program} {}", r.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Removes any earlier set (ignoring "not there"), then installs the rules with `program`
/// (normally `iptables`).
pub fn install(program: &str, c: &InterceptConfig) -> Result<(), InterceptError> {
    remove(program);
    install_rules(c).iter().try_for_each(|r| run(program, r))
}

/// Removes the rules; a no-op when none are installed.
pub fn remove(program: &str) {
    for r in remove_rules() {
        let _ = run(program, &r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_exclude_the_sidecar_and_loopback_before_redirecting() {
        let c = InterceptConfig {
            proxy_uid: 1337,
            egress_port: 15080,
            ports: vec![80, 8080],
            exclude: vec!["10.0.0.0/24".parse().unwrap()],
        };
        let lines: Vec<String> = install_rules(&c).iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            lines,
            [
                "-t nat -N TRELLIS_OUTPUT",
                "-t nat -A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-t nat -A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-t nat -A TRELLIS_OUTPUT -d 10.0.0.0/24 -j RETURN",
                "-t nat -A TRELLIS_OUTPUT -p tcp --dport 80 -j REDIRECT --to-ports 15080",
                "-t nat -A TRELLIS_OUTPUT -p tcp --dport 8080 -j REDIRECT --to-ports 15080",
                "-t nat -A OUTPUT -p tcp -j TRELLIS_OUTPUT",
            ]
        );
    }

    #[test]
    fn no_ports_means_all_tcp() {
        let c = InterceptConfig {
            proxy_uid: 0,
            egress_port: 1,
            ports: vec![],
            exclude: vec![],
        };
        let r = install_rules(&c);
        assert_eq!(
            r[r.len() - 2].join(" "),
            "-t nat -A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 1"
        );
    }

    #[test]
    fn a_missing_program_is_an_error_not_a_panic() {
        let c = InterceptConfig {
            proxy_uid: 1,
            egress_port: 2,
            ports: vec![],
            exclude: vec![],
        };
        assert!(matches!(
            install("/nonexistent/iptables", &c),
            Err(InterceptError::Spawn { .. })
        ));
    }
}
