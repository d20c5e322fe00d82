//! ALB rule conditions. All conditions of a rule must match; any value within one condition may.

use http::HeaderName;
use ipnet::IpNet;

use super::pattern::{Case, HostPattern, PathPattern, RegexPattern, Wildcard};
use super::request::RequestView;

/// At most this many values per condition (ALB allows five match evaluations per condition).
pub const MAX_VALUES: usize = 5;

/// One `query-string` value: an optional key pattern and a value pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryMatch {
    pub key: Option<Wildcard>,
    pub value: Wildcard,
}

/// How one header is compared (App Mesh / Envoy route semantics: case-sensitive values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Regex(RegexPattern),
    /// The header is there, whatever its value.
    Present,
}

impl HeaderMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            HeaderMatch::Exact(e) => value == &**e,
            HeaderMatch::Prefix(p) => value.starts_with(&**p),
            HeaderMatch::Regex(r) => r.matches(value),
            HeaderMatch::Present => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    PathPattern(Vec<PathPattern>),
    HostHeader(Vec<HostPattern>),
    HttpHeader {
        name: HeaderName,
        values: Vec<Wildcard>,
    },
    /// Methods compare exactly (uppercase, as ALB).
    HttpRequestMethod(Vec<http::Method>),
    QueryString(Vec<QueryMatch>),
    SourceIp(Vec<IpNet>),
    /// App Mesh `prefix`: the path starts with this text (case-sensitive).
    PathPrefix(Box<str>),
    /// App Mesh `path.exact`.
    PathExact(Box<str>),
    /// App Mesh `path.regex`: the whole path matches.
    PathRegex(RegexPattern),
    /// App Mesh header match; `invert` negates it (a missing header then matches).
    Header {
        name: HeaderName,
        matcher: HeaderMatch,
        invert: bool,
    },
}

impl Condition {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        match self {
            Condition::PathPattern(ps) => ps.iter().any(|p| p.matches(req.path)),
            Condition::HostHeader(hs) => match req.host {
                Some(host) => hs.iter().any(|h| h.matches(host)),
                None => false,
            },
            Condition::HttpHeader { name, values } => req
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| values.iter().any(|w| w.matches(v))),
            Condition::HttpRequestMethod(ms) => ms.iter().any(|m| m.as_str() == req.method),
            Condition::QueryString(qs) => req.query_pairs().any(|(k, v)| {
                qs.iter()
                    .any(|q| q.key.as_ref().is_none_or(|kp| kp.matches(k)) && q.value.matches(v))
            }),
            Condition::SourceIp(nets) => nets.iter().any(|n| n.contains(&req.source_ip)),
            Condition::PathPrefix(p) => req.path.starts_with(&**p),
            Condition::PathExact(p) => req.path == &**p,
            Condition::PathRegex(r) => r.matches(req.path),
            Condition::Header {
                name,
                matcher,
                invert,
            } => {
                let hit = req
                    .headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| matcher.matches(v));
                hit != *invert
            }
        }
    }

    /// Case-insensitive wildcard for header and query values.
    pub fn value_pattern(s: &str) -> Result<Wildcard, super::pattern::PatternError> {
        Wildcard::new(s, Case::Insensitive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    fn view<'a>(path: &'a str, query: Option<&'a str>, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            method: "GET",
            host: Some("api.example.com:8080"),
            path,
            query,
            headers,
            source_ip: "10.1.2.3".parse().unwrap(),
        }
    }

    fn q(key: Option<&str>, value: &str) -> QueryMatch {
        QueryMatch {
            key: key.map(|k| Condition::value_pattern(k).unwrap()),
            value: Condition::value_pattern(value).unwrap(),
        }
    }

    /// ALB query-string semantics: key/value wildcards, case-insensitive, any pair may match.
    #[test]
    fn query_string_table() {
        let h = HeaderMap::new();
        let table: &[(QueryMatch, Option<&str>, bool)] = &[
            (q(Some("version"), "v1"), Some("version=v1"), true),
            (q(Some("version"), "v1"), Some("VERSION=V1"), true),
            (q(Some("version"), "v1"), Some("a=b&version=v1"), true),
            (q(Some("version"), "v1"), Some("version=v2"), false),
            (q(Some("version"), "v*"), Some("version=v2"), true),
            (q(Some("v*"), "1"), Some("vx=1"), true),
            (q(None, "debug"), Some("x=debug"), true),
            (q(None, "debug"), Some("debug"), false), // a bare key has an empty value
            (q(Some("debug"), "*"), Some("debug"), true),
            (q(Some("version"), "v1"), None, false),
            (q(Some("a"), "?"), Some("a=12"), false),
        ];
        for (m, query, want) in table {
            let c = Condition::QueryString(vec![m.clone()]);
            assert_eq!(
                c.matches(&view("/", *query, &h)),
                *want,
                "{m:?} vs {query:?}"
            );
        }
    }

    /// App Mesh route matches: prefix vs exact vs regex paths, header exact/prefix/regex/present
    /// and inverted.
    #[test]
    fn app_mesh_path_and_header_table() {
        let mut h = HeaderMap::new();
        h.insert("x-canary", HeaderValue::from_static("Yes"));
        h.insert("x-user", HeaderValue::from_static("user-42"));
        let hdr = |name: &'static str, matcher: HeaderMatch, invert: bool| Condition::Header {
            name: HeaderName::from_static(name),
            matcher,
            invert,
        };
        let re = |s: &str| HeaderMatch::Regex(s.parse().unwrap());
        let table: Vec<(Condition, &str, bool)> = vec![
            (Condition::PathPrefix("/api".into()), "/api/v1", true),
            (Condition::PathPrefix("/api".into()), "/api", true),
            (Condition::PathPrefix("/api".into()), "/apix", true),
            (Condition::PathPrefix("/api/".into()), "/api", false),
            (Condition::PathPrefix("/api".into()), "/API", false),
            (Condition::PathExact("/api".into()), "/api", true),
            (Condition::PathExact("/api".into()), "/api/", false),
            (
                Condition::PathRegex(r"/v\d/.*".parse().unwrap()),
                "/v2/x",
                true,
            ),
            (
                Condition::PathRegex(r"/v\d/.*".parse().unwrap()),
                "/vx/x",
                false,
            ),
            (
                hdr("x-canary", HeaderMatch::Exact("Yes".into()), false),
                "/",
                true,
            ),
            (
                hdr("x-canary", HeaderMatch::Exact("yes".into()), false),
                "/",
                false,
            ),
            (
                hdr("x-user", HeaderMatch::Prefix("user-".into()), false),
                "/",
                true,
            ),
            (hdr("x-user", re(r"user-\d+"), false), "/", true),
            (hdr("x-user", re(r"user-\d"), false), "/", false),
            (hdr("x-canary", HeaderMatch::Present, false), "/", true),
            (hdr("x-missing", HeaderMatch::Present, false), "/", false),
            (hdr("x-missing", HeaderMatch::Present, true), "/", true),
            (
                hdr("x-canary", HeaderMatch::Exact("Yes".into()), true),
                "/",
                false,
            ),
        ];
        for (c, p, want) in &table {
            assert_eq!(c.matches(&view(p, None, &h)), *want, "{c:?} vs {p}");
        }
    }

    #[test]
    fn header_method_source_host() {
        let mut h = HeaderMap::new();
        h.append("x-env", HeaderValue::from_static("Canary"));
        h.append("x-env", HeaderValue::from_static("other"));
        let r = view("/", None, &h);
        let hdr = |v: &str| Condition::HttpHeader {
            name: HeaderName::from_static("x-env"),
            values: vec![Condition::value_pattern(v).unwrap()],
        };
        assert!(hdr("canary").matches(&r));
        assert!(hdr("oth*").matches(&r));
        assert!(!hdr("prod").matches(&r));
        assert!(
            Condition::HttpRequestMethod(vec![http::Method::POST, http::Method::GET]).matches(&r)
        );
        assert!(!Condition::HttpRequestMethod(vec![http::Method::POST]).matches(&r));
        assert!(Condition::SourceIp(vec!["10.0.0.0/8".parse().unwrap()]).matches(&r));
        assert!(!Condition::SourceIp(vec!["192.168.0.0/16".parse().unwrap()]).matches(&r));
        assert!(Condition::HostHeader(vec!["*.EXAMPLE.com".parse().unwrap()]).matches(&r));
        assert!(!Condition::HostHeader(vec!["example.com".parse().unwrap()]).matches(&r));
        let paths = Condition::PathPattern(vec!["/a/*".parse().unwrap(), "/".parse().unwrap()]);
        assert!(paths.matches(&r));
    }
}
