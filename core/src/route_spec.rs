//! Outbound routes as data (App Mesh `httpRoute` parity): the fields of a sidecar's
//! `[[outbound.routes]]`, and the same routes pushed from the control plane.
//!
//! A pushed route is a Cloud Map *service attribute* of the destination service, set with the
//! real `aws servicediscovery update-service-attributes`:
//!
//! | attribute key            | value                                                              |
//! |--------------------------|--------------------------------------------------------------------|
//! | `trellis:route:<name>`   | JSON: `{"priority": 10, "match": {"prefix": "/v2"}, "targets": [{"cluster": "api-v2"}]}` |
//!
//! The value holds the fields of `[[outbound.routes]]` except `upstream`, which is the service that
//! carries the attribute. The control plane checks each one when it arrives (`InvalidInput` names
//! the attribute and the field), and sends them with the service's endpoint set; the sidecars that
//! have the service as an upstream apply them in place of their configured routes for it, and go
//! back to the configured ones when the last route attribute is deleted.
//!
//! What is checked here is everything that does not depend on one sidecar's configuration: field
//! names and types, the match (one path kind, paths starting with `/`, regular expressions that
//! compile, uppercase methods, header names, one matcher per header), weights (0–999, not all 0),
//! priorities (1–50000). Whether each target cluster is one of a sidecar's upstreams is that
//! sidecar's to check.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::name::ServiceName;

/// Service attributes whose key starts with this carry a pushed route; the rest of the key names it.
pub const ROUTE_ATTRIBUTE_PREFIX: &str = "trellis:route:";
/// Longest regular expression accepted (App Mesh allows 255; Envoy's default program size caps
/// the rest).
pub const MAX_REGEX_LEN: usize = 1024;
/// Compiled-program ceiling per regex, so one route cannot take megabytes.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Route and rule priorities, lowest first (as ALB's); the route engine's too.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<u32> = 1..=50_000;
/// The largest target weight (as ALB's); the route engine's too.
pub const MAX_WEIGHT: u16 = 999;

/// What a route matches; all given fields must match, none given matches every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// The path starts with this text. At most one of `prefix`, `path`, `path_regex`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The path is exactly this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The whole path matches this regular expression (RE2 syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// HTTP method, e.g. `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatchConfig>,
}

/// One header condition: exactly one of `exact`, `prefix`, `regex`, `present = true`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchConfig {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default)]
    pub present: bool,
    /// Match when the condition does not hold.
    #[serde(default)]
    pub invert: bool,
}

/// A weighted target of a route: an upstream's cluster, or a subset of it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTarget {
    /// An upstream's service name.
    pub cluster: ServiceName,
    #[serde(default = "one")]
    pub weight: u32,
    /// Only the cluster's endpoints whose instance attributes include all of these (a subset,
    /// e.g. `{ version = "v2" }`, like an App Mesh virtual node per version).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

/// A route pushed as a service attribute: `[[outbound.routes]]` without `upstream` and `name`
/// (the service that carries it, and the attribute key's suffix).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PushedRoute {
    /// 1–50000, lowest first; pushed routes without one come after, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    pub targets: Vec<RouteTarget>,
}

/// A problem with one field: its path below the route (`.match.prefix`) and what is wrong.
pub type FieldError = (String, String);

/// Why a route's regular expression is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegexError {
    #[error("pattern is empty")]
    Empty,
    #[error("regular expression is longer than {MAX_REGEX_LEN} characters")]
    TooLong,
    #[error("bad regular expression: {0}")]
    Bad(String),
}

/// A regular expression that must match the whole input, with the length and size limits every
/// route pattern has. RE2 semantics: linear time in the input.
pub fn whole_match_regex(s: &str) -> Result<regex::Regex, RegexError> {
    if s.is_empty() {
        return Err(RegexError::Empty);
    }
    if s.len() > MAX_REGEX_LEN {
        return Err(RegexError::TooLong);
    }
    regex::RegexBuilder::new(&format!("^(?:{s})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| RegexError::Bad(e.to_string()))
}

impl RouteMatch {
    /// Everything about the match that holds for any sidecar.
    pub fn check(&self) -> Result<(), FieldError> {
        let paths = [&self.prefix, &self.path, &self.path_regex]
            .iter()
            .filter(|p| p.is_some())
            .count();
        if paths > 1 {
            return Err((
                ".match".into(),
                "give at most one of prefix, path, path_regex".into(),
            ));
        }
        for (field, p) in [("prefix", &self.prefix), ("path", &self.path)] {
            if let Some(p) = p
                && !p.starts_with('/')
            {
                return Err((format!(".match.{field}"), "must start with '/'".into()));
            }
        }
        if let Some(p) = &self.path_regex {
            whole_match_regex(p).map_err(|e| (".match.path_regex".to_owned(), e.to_string()))?;
        }
        if let Some(m) = &self.method
            && (http::Method::from_bytes(m.as_bytes()).is_err()
                || !m.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err((
                ".match.method".into(),
                format!("`{m}` is not an uppercase HTTP method"),
            ));
        }
        for (k, h) in self.headers.iter().enumerate() {
            h.check()
                .map_err(|(f, p)| (format!(".match.headers[{k}]{f}"), p))?;
        }
        Ok(())
    }
}

impl HeaderMatchConfig {
    pub fn check(&self) -> Result<(), FieldError> {
        if http::HeaderName::from_bytes(self.name.as_bytes()).is_err() {
            return Err((
                ".name".into(),
                format!("`{}` is not a header name", self.name),
            ));
        }
        let given = [
            self.exact.is_some(),
            self.prefix.is_some(),
            self.regex.is_some(),
            self.present,
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err((
                String::new(),
                "give exactly one of exact, prefix, regex, present = true".into(),
            ));
        }
        if let Some(r) = &self.regex {
            whole_match_regex(r).map_err(|e| (".regex".to_owned(), e.to_string()))?;
        }
        Ok(())
    }
}

/// Weights 0–999, at least one target, not all weights 0.
pub fn check_targets(targets: &[RouteTarget]) -> Result<(), FieldError> {
    if targets.is_empty() {
        return Err((".targets".into(), "give at least one target".into()));
    }
    for (j, t) in targets.iter().enumerate() {
        if t.weight > u32::from(MAX_WEIGHT) {
            return Err((
                format!(".targets[{j}].weight"),
                format!("{} is above {MAX_WEIGHT}", t.weight),
            ));
        }
    }
    if targets.iter().all(|t| t.weight == 0) {
        return Err((".targets".into(), "every weight is 0".into()));
    }
    Ok(())
}

/// A route priority in 1–50000.
pub fn check_priority(p: Option<u32>) -> Result<(), FieldError> {
    match p {
        Some(p) if !PRIORITY_RANGE.contains(&p) => {
            Err((".priority".into(), format!("{p} is outside 1-50000")))
        }
        _ => Ok(()),
    }
}

impl PushedRoute {
    /// Everything about the route that holds for any sidecar.
    pub fn check(&self) -> Result<(), FieldError> {
        check_priority(self.priority)?;
        self.matches.check()?;
        check_targets(&self.targets)
    }
}

/// The routes among a service's attributes, by name (`trellis:route:<name>`), each checked;
/// `None` when there are none. The error names the attribute and the field.
pub fn pushed_routes<'a>(
    attributes: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Option<Vec<(String, PushedRoute)>>, String> {
    let mut out = Vec::new();
    for (key, value) in attributes {
        let Some(name) = key.strip_prefix(ROUTE_ATTRIBUTE_PREFIX) else {
            continue;
        };
        if name.is_empty() {
            return Err(format!(
                "{key}: the key needs a route name after the prefix"
            ));
        }
        let route: PushedRoute =
            serde_json::from_str(value).map_err(|e| format!("{key}: not a route: {e}"))?;
        route
            .check()
            .map_err(|(field, problem)| format!("{key}{field}: {problem}"))?;
        out.push((name.to_owned(), route));
    }
    if out.is_empty() {
        return Ok(None);
    }
    // Explicit priorities first (lowest first), then the rest by name: one order on every sidecar.
    out.sort_by(|(an, a), (bn, b)| {
        (a.priority.unwrap_or(u32::MAX), an).cmp(&(b.priority.unwrap_or(u32::MAX), bn))
    });
    let mut seen = std::collections::HashSet::new();
    for (name, r) in &out {
        if let Some(p) = r.priority
            && !seen.insert(p)
        {
            return Err(format!(
                "{ROUTE_ATTRIBUTE_PREFIX}{name}.priority: {p} is taken by another route"
            ));
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(attrs: &[(&str, &str)]) -> Result<Option<Vec<(String, PushedRoute)>>, String> {
        pushed_routes(attrs.iter().copied())
    }

    #[test]
    fn routes_come_from_their_attributes_in_priority_then_name_order() {
        let got = routes(&[
            ("team", "core"),
            ("trellis:route:b", r#"{"targets":[{"cluster":"api"}]}"#),
            (
                "trellis:route:v2",
                r#"{"priority":10,"match":{"prefix":"/v2","headers":[{"name":"x-canary","present":true}]},
                   "targets":[{"cluster":"api-v2","weight":9},{"cluster":"api","attributes":{"version":"v1"}}]}"#,
            ),
            ("trellis:route:a", r#"{"targets":[{"cluster":"api"}]}"#),
        ])
        .unwrap()
        .unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["v2", "a", "b"]);
        let v2 = &got[0].1;
        assert_eq!(v2.matches.prefix.as_deref(), Some("/v2"));
        assert_eq!(v2.targets[0].weight, 9);
        assert_eq!(v2.targets[1].weight, 1);
        assert_eq!(v2.targets[1].attributes["version"], "v1");
        assert_eq!(routes(&[("team", "core")]).unwrap(), None);
    }

    #[test]
    fn bad_routes_name_the_attribute_and_field() {
        let cases = [
            (
                r#"{"targets":[]}"#,
                "trellis:route:r.targets: give at least one target",
            ),
            (
                r#"{"targets":[{"cluster":"api","weight":1000}]}"#,
                "trellis:route:r.targets[0].weight",
            ),
            (
                r#"{"targets":[{"cluster":"api","weight":0}]}"#,
                "every weight is 0",
            ),
            (
                r#"{"priority":0,"targets":[{"cluster":"api"}]}"#,
                "trellis:route:r.priority",
            ),
            (
                r#"{"match":{"prefix":"v2"},"targets":[{"cluster":"api"}]}"#,
                "trellis:route:r.match.prefix",
            ),
            (
                r#"{"match":{"prefix":"/a","path":"/b"},"targets":[{"cluster":"api"}]}"#,
                "at most one of",
            ),
            (
                r#"{"match":{"path_regex":"/("},"targets":[{"cluster":"api"}]}"#,
                "trellis:route:r.match.path_regex",
            ),
            (
                r#"{"match":{"method":"get"},"targets":[{"cluster":"api"}]}"#,
                "trellis:route:r.match.method",
            ),
            (
                r#"{"match":{"headers":[{"name":"bad name","present":true}]},"targets":[{"cluster":"api"}]}"#,
                "trellis:route:r.match.headers[0].name",
            ),
            (
                r#"{"match":{"headers":[{"name":"x","exact":"1","present":true}]},"targets":[{"cluster":"api"}]}"#,
                "exactly one of",
            ),
            (
                r#"{"targets":[{"cluster":"Not A Name"}]}"#,
                "trellis:route:r: not a route",
            ),
            (
                r#"{"targets":[{"cluster":"api"}],"upstream":"x"}"#,
                "unknown field `upstream`",
            ),
            ("not json", "trellis:route:r: not a route"),
        ];
        for (value, want) in cases {
            let err = routes(&[("trellis:route:r", value)]).unwrap_err();
            assert!(err.contains(want), "{value}: {err}");
        }
        let err = routes(&[("trellis:route:", r#"{"targets":[{"cluster":"api"}]}"#)]).unwrap_err();
        assert!(err.contains("needs a route name"), "{err}");
        let err = routes(&[
            (
                "trellis:route:a",
                r#"{"priority":5,"targets":[{"cluster":"api"}]}"#,
            ),
            (
                "trellis:route:b",
                r#"{"priority":5,"targets":[{"cluster":"api"}]}"#,
            ),
        ])
        .unwrap_err();
        assert!(
            err.contains("trellis:route:b.priority: 5 is taken"),
            "{err}"
        );
    }

    #[test]
    fn regexes_match_the_whole_input() {
        let re = whole_match_regex("/users/[0-9]+").unwrap();
        assert!(re.is_match("/users/42"));
        assert!(!re.is_match("/users/42/x"));
        assert!(whole_match_regex("").is_err());
        assert!(whole_match_regex(&"a".repeat(MAX_REGEX_LEN + 1)).is_err());
    }
}
