//! The compiled rule index: matching cost stays flat as rules grow.
//!
//! Rules whose every path pattern pins the first path segment (`/api/*`, `/api`) are bucketed by
//! that segment; the rest (no path condition, or a wildcard in the first segment) go to a
//! general list. A request looks up its own first segment and walks the two ascending candidate
//! lists merged, so it only evaluates rules that could match, still in priority order.

use std::collections::HashMap;

use super::action::Action;
use super::condition::Condition;
use super::request::RequestView;
use super::rule::{Priority, Rule};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    #[error("rules {first:?} and {second:?} share priority {priority}")]
    DuplicatePriority {
        priority: u32,
        first: String,
        second: String,
    },
}

/// What routing decided.
#[derive(Debug, Clone, Copy)]
pub enum Matched<'a> {
    /// Position of the rule in [`RuleIndex::rules`] and the rule.
    Rule(usize, &'a Rule),
    Default(&'a Action),
}

impl<'a> Matched<'a> {
    pub fn action(&self) -> &'a Action {
        match self {
            Matched::Rule(_, r) => &r.action,
            Matched::Default(a) => a,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RuleIndex {
    /// Sorted by priority, so a smaller position means evaluated first.
    rules: Vec<Rule>,
    by_segment: HashMap<Box<str>, Vec<u32>, SegmentHash>,
    general: Vec<u32>,
    default: Action,
    /// Some rule or action reads the request's host (a `host-header` condition, a redirect).
    reads_host: bool,
}

impl RuleIndex {
    pub fn new(mut rules: Vec<Rule>, default: Action) -> Result<Self, IndexError> {
        rules.sort_by_key(|r| r.priority);
        if let Some(w) = rules.windows(2).find(|w| w[0].priority == w[1].priority) {
            return Err(IndexError::DuplicatePriority {
                priority: w[0].priority.get(),
                first: w[0].name.to_string(),
                second: w[1].name.to_string(),
            });
        }
        let mut by_segment: HashMap<Box<str>, Vec<u32>, SegmentHash> = HashMap::default();
        let mut general = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let i = i as u32;
            match pinned_segments(rule) {
                Some(segs) => {
                    for s in segs {
                        let list = by_segment.entry(s.into()).or_default();
                        if list.last() != Some(&i) {
                            list.push(i);
                        }
                    }
                }
                None => general.push(i),
            }
        }
        Ok(Self {
            reads_host: reads_host(&rules, &default),
            rules,
            by_segment,
            general,
            default,
        })
    }

    /// Whether routing needs [`RequestView::host`]: when false, a view without it routes the
    /// same.
    pub fn reads_host(&self) -> bool {
        self.reads_host
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn default_action(&self) -> &Action {
        &self.default
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.rules.iter().position(|r| &*r.name == name)
    }

    pub fn priority_of(&self, pos: usize) -> Option<Priority> {
        self.rules.get(pos).map(|r| r.priority)
    }

    /// The same index with the rule at `pos` replaced (same priority and path conditions).
    pub fn with_action(&self, pos: usize, action: Action) -> Self {
        let mut next = self.clone();
        if let Some(r) = next.rules.get_mut(pos) {
            r.action = action;
        }
        next.reads_host = reads_host(&next.rules, &next.default);
        next
    }

    /// The lowest-priority rule that matches, else the default action. No allocation.
    pub fn route(&self, req: &RequestView<'_>) -> Matched<'_> {
        let bucket: &[u32] = if self.by_segment.is_empty() {
            &[]
        } else {
            self.by_segment
                .get(req.first_segment())
                .map_or(&[], Vec::as_slice)
        };
        let (mut a, mut b) = (bucket.iter().peekable(), self.general.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x < y => a.next(),
                (Some(_), Some(_)) | (None, Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, None) => break,
            };
            let Some(&i) = next else { break };
            let rule = &self.rules[i as usize];
            if rule.matches(req) {
                return Matched::Rule(i as usize, rule);
            }
        }
        Matched::Default(&self.default)
    }

    /// Reference semantics: every rule in priority order. The index must agree with it.
    pub fn scan(&self, req: &RequestView<'_>) -> Matched<'_> {
        match self.rules.iter().enumerate().find(|(_, r)| r.matches(req)) {
            Some((i, r)) => Matched::Rule(i, r),
            None => Matched::Default(&self.default),
        }
    }
}

/// A `host-header` condition or a redirect (its location may use `#{host}`) anywhere.
fn reads_host(rules: &[Rule], default: &Action) -> bool {
    let redirects = |a: &Action| matches!(a, Action::Redirect(_));
    redirects(default)
        || rules.iter().any(|r| {
            redirects(&r.action)
                || r.conditions
                    .iter()
                    .any(|c| matches!(c, Condition::HostHeader(_)))
        })
}

/// FNV-1a for the segment map: short keys, and SipHash's flooding resistance buys nothing here
/// because the stored keys come from config, not from clients (a client only looks up).
type SegmentHash = crate::fnv::FnvBuild;

/// First segments every matching path must have, when the rule pins them (any one of its
/// path conditions is enough: all must match).
fn pinned_segments(rule: &Rule) -> Option<Vec<&str>> {
    rule.conditions.iter().find_map(|c| match c {
        Condition::PathPattern(ps) => ps.iter().map(|p| p.literal_first_segment()).collect(),
        Condition::PathExact(p) => {
            let rest = p.strip_prefix('/')?;
            Some(vec![rest.split('/').next().unwrap_or("")])
        }
        // `/api/` pins `api`; `/api` does not (it also matches `/apix`).
        Condition::PathPrefix(p) => {
            let (seg, _) = p.strip_prefix('/')?.split_once('/')?;
            Some(vec![seg])
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::action::FixedResponse;
    use crate::route::condition::{Condition, QueryMatch};
    use http::HeaderMap;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn fixed(status: u16) -> Action {
        Action::FixedResponse(FixedResponse::new(status, None, "").unwrap())
    }

    fn rule(name: &str, prio: u32, conditions: Vec<Condition>) -> Rule {
        Rule {
            name: name.into(),
            priority: Priority::try_from(prio).unwrap(),
            conditions,
            action: fixed(200),
        }
    }

    fn paths(ps: &[&str]) -> Condition {
        Condition::PathPattern(ps.iter().map(|p| p.parse().unwrap()).collect())
    }

    fn view<'a>(path: &'a str, h: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            method: "GET",
            host: Some("a.example.com"),
            path,
            query: None,
            headers: h,
            source_ip: "127.0.0.1".parse().unwrap(),
        }
    }

    fn name<'a>(m: Matched<'a>) -> &'a str {
        match m {
            Matched::Rule(_, r) => &r.name,
            Matched::Default(_) => "<default>",
        }
    }

    #[test]
    fn the_host_is_read_only_for_host_conditions_and_redirects() {
        let path_only = vec![rule("api", 1, vec![paths(&["/api/*"])])];
        let idx = RuleIndex::new(path_only.clone(), fixed(404)).unwrap();
        assert!(!idx.reads_host());
        let host = Condition::HostHeader(vec!["*.example.com".parse().unwrap()]);
        let with_host = vec![path_only[0].clone(), rule("h", 2, vec![host])];
        assert!(RuleIndex::new(with_host, fixed(404)).unwrap().reads_host());
        let redirect = || {
            Action::Redirect(
                crate::route::Redirect::new(301, crate::route::RedirectParts::default()).unwrap(),
            )
        };
        assert!(
            RuleIndex::new(path_only.clone(), redirect())
                .unwrap()
                .reads_host()
        );
        // A live action change to a redirect is seen too.
        assert!(idx.with_action(0, redirect()).reads_host());
        // The LB's view: without the host when nothing reads it.
        let req = http::Request::builder()
            .uri("/api/x")
            .header("host", "a.example.com")
            .body(())
            .unwrap();
        let ip = "127.0.0.1".parse().unwrap();
        assert_eq!(RequestView::reading_host(&req, ip, false).host, None);
        assert_eq!(
            RequestView::reading_host(&req, ip, true).host,
            RequestView::of(&req, ip).host
        );
        assert_eq!(RequestView::of(&req, ip).host, Some("a.example.com"));
    }

    #[test]
    fn lowest_priority_wins_across_buckets() {
        let idx = RuleIndex::new(
            vec![
                rule("api", 20, vec![paths(&["/api/*"])]),
                rule("catch-all-api", 10, vec![paths(&["*/api/*"])]),
                rule("users", 5, vec![paths(&["/api/users"])]),
                rule(
                    "method",
                    30,
                    vec![Condition::HttpRequestMethod(vec![http::Method::GET])],
                ),
            ],
            fixed(404),
        )
        .unwrap();
        let h = HeaderMap::new();
        assert_eq!(name(idx.route(&view("/api/users", &h))), "users");
        assert_eq!(name(idx.route(&view("/api/x", &h))), "catch-all-api");
        assert_eq!(name(idx.route(&view("/other", &h))), "method");
    }

    #[test]
    fn exact_and_prefix_paths_are_bucketed_without_changing_results() {
        let idx = RuleIndex::new(
            vec![
                rule("exact", 1, vec![Condition::PathExact("/api/users".into())]),
                rule("prefix-dir", 2, vec![Condition::PathPrefix("/api/".into())]),
                rule("prefix-open", 3, vec![Condition::PathPrefix("/ap".into())]),
                rule("root-exact", 4, vec![Condition::PathExact("/".into())]),
            ],
            fixed(404),
        )
        .unwrap();
        assert_eq!(idx.general.len(), 1, "only the open prefix is unbucketed");
        let h = HeaderMap::new();
        for (path, want) in [
            ("/api/users", "exact"),
            ("/api/users/1", "prefix-dir"),
            ("/api", "prefix-open"),
            ("/apix", "prefix-open"),
            ("/", "root-exact"),
            ("/other", "<default>"),
        ] {
            assert_eq!(name(idx.route(&view(path, &h))), want, "{path}");
            assert_eq!(name(idx.scan(&view(path, &h))), want, "{path}");
        }
    }

    #[test]
    fn duplicate_priority_is_named() {
        let err = RuleIndex::new(vec![rule("a", 7, vec![]), rule("b", 7, vec![])], fixed(404))
            .unwrap_err();
        assert_eq!(
            err,
            IndexError::DuplicatePriority {
                priority: 7,
                first: "a".into(),
                second: "b".into()
            }
        );
        assert!(Priority::try_from(0).is_err());
        assert!(Priority::try_from(50_001).is_err());
    }

    const SEGS: [&str; 6] = ["api", "img", "a", "b", "", "v1"];
    const TAILS: [&str; 6] = ["*", "x", "?", "x/*", "*.png", "b"];

    fn random_pattern(rng: &mut StdRng) -> String {
        let seg = SEGS[rng.random_range(0..SEGS.len())];
        let tail = TAILS[rng.random_range(0..TAILS.len())];
        match rng.random_range(0..5) {
            0 => format!("/{seg}"),
            1 => format!("*{tail}"),
            2 => format!("/{seg}?/{tail}"),
            _ => format!("/{seg}/{tail}"),
        }
    }

    fn random_path(rng: &mut StdRng) -> String {
        let seg = SEGS[rng.random_range(0..SEGS.len())];
        let tail = ["x", "y.png", "x/y", "", "b", "q"][rng.random_range(0..6)];
        match rng.random_range(0..4) {
            0 => format!("/{seg}"),
            1 => format!("/{seg}1/{tail}"),
            _ => format!("/{seg}/{tail}"),
        }
    }

    /// Differential test: random rule sets and requests; the index picks what a scan picks.
    #[test]
    fn index_agrees_with_priority_scan() {
        let mut rng = StdRng::seed_from_u64(0x7e_1115);
        let h = HeaderMap::new();
        for round in 0..200 {
            let n = rng.random_range(1..40);
            let mut prios: Vec<u32> = (1..=200).collect();
            let rules = (0..n)
                .map(|i| {
                    let p = prios.swap_remove(rng.random_range(0..prios.len()));
                    let mut conds = Vec::new();
                    if rng.random_bool(0.8) {
                        let k = rng.random_range(1..=3);
                        let ps: Vec<String> = (0..k).map(|_| random_pattern(&mut rng)).collect();
                        let refs: Vec<&str> = ps.iter().map(String::as_str).collect();
                        conds.push(paths(&refs));
                    }
                    if rng.random_bool(0.2) {
                        conds.push(Condition::HttpRequestMethod(vec![http::Method::POST]));
                    }
                    if rng.random_bool(0.1) {
                        conds.push(Condition::QueryString(vec![QueryMatch {
                            key: None,
                            value: Condition::value_pattern("*").unwrap(),
                        }]));
                    }
                    rule(&format!("r{round}-{i}"), p, conds)
                })
                .collect();
            let idx = RuleIndex::new(rules, fixed(404)).unwrap();
            for _ in 0..50 {
                let path = random_path(&mut rng);
                let req = view(&path, &h);
                assert_eq!(
                    name(idx.route(&req)),
                    name(idx.scan(&req)),
                    "round {round} path {path}"
                );
            }
        }
    }

    #[test]
    fn thousand_rules_evaluate_few_candidates() {
        let rules = (1..=1000)
            .map(|i| rule(&format!("r{i}"), i, vec![paths(&[&format!("/svc{i}/*")])]))
            .collect();
        let idx = RuleIndex::new(rules, fixed(404)).unwrap();
        assert!(idx.general.is_empty());
        assert_eq!(idx.by_segment.get("svc999").map(Vec::len), Some(1));
        let h = HeaderMap::new();
        assert_eq!(name(idx.route(&view("/svc999/x", &h))), "r999");
        assert_eq!(name(idx.route(&view("/nope", &h))), "<default>");
    }

    /// Microbench, not a test: `cargo test --release -p trellis-proxy --lib route_match_cost --
    /// --ignored --nocapture` prints ns per match at 1, 100 and 1,000 rules (index and scan).
    #[test]
    #[ignore]
    fn route_match_cost() {
        let h = HeaderMap::new();
        for n in [1u32, 100, 1000] {
            let rules = (1..=n)
                .map(|i| rule(&format!("r{i}"), i, vec![paths(&[&format!("/svc{i}/*")])]))
                .collect();
            let idx = RuleIndex::new(rules, fixed(404)).unwrap();
            let path = format!("/svc{n}/item");
            let req = view(&path, &h);
            const ITERS: u32 = 200_000;
            let t = std::time::Instant::now();
            for _ in 0..ITERS {
                std::hint::black_box(idx.route(std::hint::black_box(&req)));
            }
            let indexed = t.elapsed() / ITERS;
            let t = std::time::Instant::now();
            for _ in 0..ITERS / 10 {
                std::hint::black_box(idx.scan(std::hint::black_box(&req)));
            }
            let scanned = t.elapsed() / (ITERS / 10);
            println!("{n:>5} rules: index {indexed:?}/match, linear scan {scanned:?}/match");
        }
    }
}
