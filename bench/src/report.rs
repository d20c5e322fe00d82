//! Results: a Markdown table per scenario with medians, spread and the ratio of trellis to every
//! peer; the raw runs as JSON; an SVG bar chart of the medians.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::load::Sample;

/// Every run of one subject (trellis, nginx, HAProxy, direct, ...) in one scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub subject: String,
    pub runs: Vec<Sample>,
}

/// One scenario's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub name: String,
    pub title: String,
    /// What `rate` counts ("req/s", "queries/s", "certs/s", "MB/s").
    pub unit: String,
    /// The subject whose ratio to the others is printed (a trellis subject).
    pub ours: String,
    pub rows: Vec<Row>,
    /// Targets with their verdict, and anything a reader must know (e.g. why a target was missed).
    pub notes: Vec<String>,
}

impl Row {
    /// Median CPU µs per request, when every run measured it.
    pub fn cpu_median(&self) -> Option<f64> {
        self.runs
            .iter()
            .all(|s| s.cpu_us_per_req.is_some())
            .then(|| self.median(|s| s.cpu_us_per_req.unwrap_or(0.0)))
    }
    pub fn median(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        let mut v: Vec<f64> = self.runs.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    pub fn spread(&self, f: impl Fn(&Sample) -> f64) -> (f64, f64) {
        let v: Vec<f64> = self.runs.iter().map(f).collect();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    }
    pub fn rate(&self) -> f64 {
        self.median(|s| s.rate)
    }
}

impl ScenarioResult {
    pub fn row(&self, subject: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.subject == subject)
    }

    /// ours.rate / subject.rate, when both exist.
    pub fn ratio(&self, subject: &str) -> Option<f64> {
        let ours = self.row(&self.ours)?.rate();
        let theirs = self.row(subject)?.rate();
        (theirs > 0.0).then(|| ours / theirs)
    }

    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### {}\n", self.title);
        let _ = writeln!(
            out,
            "| subject | {} (median) | spread | p50 µs | p99 µs | p99.9 µs | CPU µs/req | RSS MiB | errors | {} / subject |",
            self.unit, self.ours
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in &self.rows {
            let (lo, hi) = row.spread(|s| s.rate);
            let cpu = row.cpu_median();
            let rss = row
                .runs
                .last()
                .and_then(|s| s.rss_kib)
                .map(|k| format!("{:.1}", k as f64 / 1024.0));
            let ratio = if row.subject == self.ours {
                "—".to_owned()
            } else {
                self.ratio(&row.subject)
                    .map(|r| format!("**{r:.2}×**"))
                    .unwrap_or_else(|| "n/a".into())
            };
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.0}–{:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
                row.subject,
                row.rate(),
                lo,
                hi,
                row.median(|s| s.p50_us),
                row.median(|s| s.p99_us),
                row.median(|s| s.p999_us),
                cpu.map(|c| format!("{c:.1}"))
                    .unwrap_or_else(|| "n/a".into()),
                rss.unwrap_or_else(|| "n/a".into()),
                row.runs.iter().map(|s| s.errors).sum::<u64>(),
                ratio
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "\n- {note}");
        }
        out.push('\n');
        out
    }

    /// A bar chart of the median rates.
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        let root = SVGBackend::new(path, (720, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let max = self.rows.iter().map(Row::rate).fold(0.0, f64::max).max(1.0) * 1.15;
        let n = self.rows.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, 0f64..max)?;
        let names: Vec<String> = self.rows.iter().map(|r| r.subject.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(self.unit.as_str())
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                names.get(i).cloned().unwrap_or_default()
            })
            .draw()?;
        chart.draw_series(self.rows.iter().enumerate().map(|(i, r)| {
            let color = if r.subject == self.ours {
                BLUE
            } else {
                RGBColor(150, 150, 150)
            };
            Rectangle::new(
                [(i as f64 + 0.2, 0.0), (i as f64 + 0.8, r.rate())],
                color.filled(),
            )
        }))?;
        root.present()?;
        Ok(())
    }
}

/// A latency series of the latency plot: label, which field, bar colour.
type Percentile = (&'static str, fn(&Sample) -> f64, RGBColor);

impl ScenarioResult {
    /// Whether any subject reported latency percentiles.
    pub fn has_latency(&self) -> bool {
        self.rows.iter().any(|r| r.median(|s| s.p99_us) > 0.0)
    }

    /// Grouped bars of the median p50 / p99 / p99.9 latency per subject (µs).
    pub fn write_latency_svg(&self, path: &Path) -> Result<()> {
        let root = SVGBackend::new(path, (720, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let pcts: [Percentile; 3] = [
            ("p50", |s| s.p50_us, RGBColor(120, 170, 230)),
            ("p99", |s| s.p99_us, RGBColor(40, 100, 200)),
            ("p99.9", |s| s.p999_us, RGBColor(10, 40, 120)),
        ];
        let max = self
            .rows
            .iter()
            .flat_map(|r| pcts.iter().map(move |(_, f, _)| r.median(f)))
            .fold(0.0, f64::max)
            .max(1.0)
            * 1.15;
        let n = self.rows.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{}: latency", self.title), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, 0f64..max)?;
        let names: Vec<String> = self.rows.iter().map(|r| r.subject.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc("µs (p50, p99, p99.9)")
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                names.get(i).cloned().unwrap_or_default()
            })
            .draw()?;
        for (k, (label, f, color)) in pcts.iter().enumerate() {
            chart
                .draw_series(self.rows.iter().enumerate().map(|(i, r)| {
                    let x0 = i as f64 + 0.15 + k as f64 * 0.23;
                    Rectangle::new([(x0, 0.0), (x0 + 0.2, r.median(f))], color.filled())
                }))?
                .label(*label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

/// Writes `<dir>/results.md`, `<dir>/results.json` and SVGs per scenario: the rates, and the
/// latency percentiles where the load generator reports them.
pub fn write_all(dir: &Path, header: &str, results: &[ScenarioResult]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut md = String::from(header);
    for r in results {
        md.push_str(&r.to_markdown());
        md.push_str(&format!("![{}]({}.svg)\n\n", r.title, r.name));
        r.write_svg(&dir.join(format!("{}.svg", r.name)))?;
        if r.has_latency() {
            md.push_str(&format!(
                "![{} latency]({}-latency.svg)\n\n",
                r.title, r.name
            ));
            r.write_latency_svg(&dir.join(format!("{}-latency.svg", r.name)))?;
        }
    }
    std::fs::write(dir.join("results.md"), md)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rate: f64) -> Sample {
        Sample {
            rate,
            ..Sample::default()
        }
    }

    #[test]
    fn medians_ratios_and_outputs() {
        let r = ScenarioResult {
            name: "t".into(),
            title: "test".into(),
            unit: "req/s".into(),
            ours: "trellis".into(),
            rows: vec![
                Row {
                    subject: "trellis".into(),
                    runs: vec![sample(90.0), sample(120.0), sample(100.0)],
                },
                Row {
                    subject: "haproxy".into(),
                    runs: vec![sample(80.0), sample(70.0)],
                },
            ],
            notes: vec!["a note".into()],
        };
        assert_eq!(r.row("trellis").unwrap().rate(), 100.0);
        assert_eq!(r.row("haproxy").unwrap().rate(), 75.0);
        assert!((r.ratio("haproxy").unwrap() - 100.0 / 75.0).abs() < 1e-9);
        let md = r.to_markdown();
        assert!(md.contains("**1.33×**"), "{md}");
        let dir = std::env::temp_dir().join(format!("trellis-bench-test-{}", std::process::id()));
        assert!(!r.has_latency());
        let mut with_latency = r.clone();
        with_latency.name = "l".into();
        for s in &mut with_latency.rows[0].runs {
            s.p99_us = 900.0;
        }
        write_all(&dir, "# h\n", &[r, with_latency]).unwrap();
        let svg = std::fs::read_to_string(dir.join("t.svg")).unwrap();
        assert!(svg.contains("<svg"));
        assert!(!dir.join("t-latency.svg").exists());
        let svg = std::fs::read_to_string(dir.join("l-latency.svg")).unwrap();
        assert!(svg.contains("p99.9"), "{svg}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
