//! The compose observability files stay valid: `promtool check config` on the Prometheus config,
//! and the Grafana dashboard's queries are valid PromQL (`promtool check rules` on a rules file made
//! of them) over metric names the code really exports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use trellis_test_support::tools::{self, workspace_root};

fn dashboard() -> serde_json::Value {
    let path = workspace_root().join("compose/grafana/dashboards/trellis-golden-signals.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn exprs(d: &serde_json::Value) -> Vec<String> {
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn prometheus_config_passes_promtool() {
    let Some(promtool) = tools::require("promtool", "Prometheus config check") else {
        return;
    };
    let out = Command::new(promtool)
        .args(["check", "config", "--syntax-only"])
        .arg(workspace_root().join("compose/prometheus.yml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn dashboard_covers_the_golden_signals_with_valid_promql() {
    let d = dashboard();
    let titles: Vec<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_lowercase())
        .collect();
    for signal in ["requests", "error", "latency", "saturation"] {
        assert!(
            titles.iter().any(|t| t.contains(signal)),
            "no {signal} panel"
        );
    }
    // Every metric a query names is exported by some crate (guards against renames).
    let mut sources = String::new();
    for dir in ["proxy/src", "proxy/src/lb", "discovery/src", "ca/src"] {
        for entry in std::fs::read_dir(workspace_root().join(dir)).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(p).unwrap());
            }
        }
    }
    let name = regex_lite_metric_names;
    for e in exprs(&d) {
        for m in name(&e) {
            let base = m.strip_suffix("_bucket").unwrap_or(&m);
            assert!(
                sources.contains(&format!("\"{base}\"")),
                "{base} (in `{e}`) is not exported by any crate"
            );
        }
    }

    let Some(promtool) = tools::require("promtool", "PromQL check") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs(&d).iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    let path = dir.path().join("rules.yml");
    std::fs::write(&path, rules).unwrap();
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// `trellis_...` identifiers in a PromQL expression.
fn regex_lite_metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("trellis_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}
