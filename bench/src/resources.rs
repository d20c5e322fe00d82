//! CPU time and resident memory of a process tree, read from /proc (Linux).

use std::collections::HashMap;

/// CPU seconds (user + system) of `pid` and all its descendants.
pub fn cpu_seconds(pid: u32) -> f64 {
    let (user, sys) = cpu_split(pid);
    user + sys
}

/// User and system CPU seconds of `pid` and its descendants.
pub fn cpu_split(pid: u32) -> (f64, f64) {
    // USER_HZ is 100 on every Linux this runs on (the kernel ABI fixes it for /proc).
    let ticks = 100.0;
    tree(pid)
        .iter()
        .filter_map(|p| stat_fields(*p))
        .fold((0.0, 0.0), |(u, s), f| {
            (u + f.utime as f64 / ticks, s + f.stime as f64 / ticks)
        })
}

/// Busy and total jiffies of one CPU so far (`/proc/stat`; idle and iowait are not busy).
pub fn cpu_jiffies(cpu: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let total: u64 = f.iter().sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// The share of the time `cpu` was busy between two [`cpu_jiffies`] readings.
pub fn busy_between(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let total = after.1.checked_sub(before.1)?;
    let busy = after.0.checked_sub(before.0)?;
    (total > 0).then(|| busy as f64 / total as f64)
}

/// Resident set size in KiB of `pid` and its descendants.
pub fn rss_kib(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
}

fn stat_fields(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
    })
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
                && let Some(st) = stat_fields(p)
            {
                children.entry(st.ppid).or_default().push(p);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c);
        }
        i += 1;
    }
    out
}
