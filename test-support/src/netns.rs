//! A lab of "hosts" in network namespaces created by the test: each host has `lo` and `eth0` (a veth
//! whose peer sits on a bridge inside the lab's own switch namespace), with an address in
//! 10.251.<lab>.0/24 that exists only inside the lab. Nothing is added to the root namespace, and
//! everything is deleted on drop — also when the test panics.

use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};

static NEXT_LAB: AtomicU8 = AtomicU8::new(0);

/// One host of a [`Lab`].
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
}

impl Host {
    /// A command that runs inside this host's namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).arg(program);
        c
    }

    /// Runs a shell command in the host and returns its output.
    pub fn sh(&self, script: &str) -> Output {
        self.command("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("run ip netns exec")
    }
}

/// The lab; dropping it removes every namespace (and with them every veth and the bridge).
#[derive(Debug)]
pub struct Lab {
    pub hosts: Vec<Host>,
    switch: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lab {
    /// Creates `names.len()` hosts. Needs root; callers check [`crate::tools::is_root`] first.
    pub fn new(names: &[&str]) -> Result<Lab, String> {
        let lab = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let tag = format!("tr{}-{lab}", std::process::id());
        let switch = format!("{tag}-sw");
        let mut me = Lab {
            hosts: Vec::new(),
            switch: switch.clone(),
        };
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        ip(&["-n", &switch, "link", "set", "lo", "up"])?;
        for (i, name) in names.iter().enumerate() {
            let netns = format!("{tag}-{name}");
            ip(&["netns", "add", &netns])?;
            let addr = Ipv4Addr::new(10, 251, lab, 10 + i as u8);
            me.hosts.push(Host {
                name: (*name).to_owned(),
                netns: netns.clone(),
                addr,
            });
            let port = format!("p{i}");
            // Create the pair in the switch namespace, then move one end into the host.
            ip(&[
                "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &switch, "link", "set", &port, "up"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        }
        Ok(me)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the lab"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &self.hosts {
            // Kill whatever still runs in the namespace, then delete it.
            let _ = Command::new("ip")
                .args(["netns", "pids", &h.netns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                });
            let _ = ip(&["netns", "del", &h.netns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::is_root;

    #[test]
    fn hosts_reach_each_other_and_cleanup_is_complete() {
        if !is_root() {
            eprintln!("skipping: network namespaces need root");
            return;
        }
        let lab = Lab::new(&["a", "b"]).unwrap();
        let (a, b) = (lab.host("a").clone(), lab.host("b").clone());
        let out = a.sh(&format!("ping -c1 -W2 {} >/dev/null && echo ok", b.addr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "{out:?}");
        let netns = a.netns.clone();
        drop(lab);
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&list.stdout).contains(&netns));
    }
}
