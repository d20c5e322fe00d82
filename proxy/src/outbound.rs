//! The sidecar's outbound routing: per-upstream route tables compiled into the shared
//! [`crate::route`] engine (the LB's engine), swapped whole with `arc-swap`, read without a lock.
//!
//! Each upstream (a virtual service, reached by `Host` on the egress listener or by its local
//! port) has one [`RuleIndex`]. Its rules come from `[[outbound.routes]]`; its default action
//! forwards to the upstream's own cluster. A forward action's weighted groups are target slots —
//! the upstreams in config order, then the attribute subsets routes name (`{ cluster = "api",
//! attributes = { version = "v2" } }`) — so a pick is an index into the target table: no lookup by
//! name, no allocation. A subset that a reload or a pushed route names for the first time gets the
//! next free slot while the sidecar runs (at most [`MAX_SUBSETS`]); slots are filled once and never
//! change, so a request borrows its target without a lock or a reference count.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderName, Method, Request};

use trellis_core::route_spec::{ROUTE_ATTRIBUTE_PREFIX, check_targets};

use crate::config::{HeaderMatchConfig, OutboundConfig, Protocol, RouteConfig, RouteMatch};
use crate::error::ConfigError;
use crate::forward::Target;
use crate::route::{
    Action, Condition, Forward, HeaderMatch, Priority, RegexPattern, RequestView, Rule, RuleIndex,
    Weight, WeightedGroup,
};

/// Priority of the first route written without one; later ones follow in order.
const IMPLICIT_PRIORITY_BASE: u32 = 40_000;

/// Attribute subsets one sidecar keeps at most (configured and pushed, over its lifetime: a subset's
/// cluster stays until restart once made).
pub const MAX_SUBSETS: usize = 64;

/// A route target that is part of an upstream's cluster: its endpoints with these attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subset {
    /// Upstream position.
    pub upstream: usize,
    pub attributes: BTreeMap<String, String>,
}

/// Route tables by upstream position (as in `outbound.upstreams`), and the subsets whose target
/// slots follow the upstreams'.
#[derive(Debug, Clone)]
pub struct RouteTables {
    tables: Vec<RuleIndex>,
    subsets: Vec<Subset>,
    /// By upstream: the one slot every request goes to when the upstream has no routes (the
    /// common case), so routing reads nothing of the request.
    fixed: Vec<Option<usize>>,
}

impl RouteTables {
    fn new(tables: Vec<RuleIndex>, subsets: Vec<Subset>) -> Self {
        let fixed = tables
            .iter()
            .map(|t| match t.default_action() {
                Action::Forward(f) if t.rules().is_empty() && f.groups().len() == 1 => {
                    f.groups().first().map(|g| g.slot)
                }
                _ => None,
            })
            .collect();
        Self {
            tables,
            subsets,
            fixed,
        }
    }

    /// Subset `i` has target slot `upstreams + i`.
    pub fn subsets(&self) -> &[Subset] {
        &self.subsets
    }

    /// The upstream position a request for upstream `u` goes to. `rnd` is uniform over `u32`.
    pub fn pick(&self, u: usize, req: &RequestView<'_>, rnd: u32) -> usize {
        let Some(table) = self.tables.get(u) else {
            return u;
        };
        match table.route(req).action() {
            Action::Forward(f) => f.pick(req.headers, rnd).group.slot,
            // Outbound routes only compile forward actions.
            Action::FixedResponse(_) | Action::Redirect(_) => u,
        }
    }
}

/// The live routing state of the outbound side.
#[derive(Debug)]
pub struct Router {
    tables: ArcSwap<RouteTables>,
    /// By slot: the upstreams in config order, then the attribute subsets as they are made (the
    /// slots after them are empty until then).
    targets: Box<[OnceLock<Target>]>,
    upstreams: usize,
}

impl Router {
    /// A router over the upstreams' `targets` (in config order), with room for [`MAX_SUBSETS`]
    /// subsets. Until the first [`Router::swap`] every request goes to its own upstream.
    pub fn new(targets: Vec<Target>) -> Self {
        let upstreams = targets.len();
        let slots = targets
            .into_iter()
            .map(OnceLock::from)
            .chain(std::iter::repeat_with(OnceLock::new).take(MAX_SUBSETS))
            .collect();
        Self {
            tables: ArcSwap::from_pointee(RouteTables::new(Vec::new(), Vec::new())),
            targets: slots,
            upstreams,
        }
    }

    /// Installs new route tables; requests already routed keep their target. Every slot they
    /// name must have its target ([`Router::add_subset`]) first.
    pub fn swap(&self, tables: RouteTables) {
        self.tables.store(Arc::new(tables));
    }

    /// Fills subset `i`'s slot; `false` if it already had a target (which stays).
    pub fn add_subset(&self, i: usize, target: Target) -> bool {
        self.targets
            .get(self.upstreams + i)
            .is_some_and(|slot| slot.set(target).is_ok())
    }

    pub fn target(&self, u: usize) -> Option<&Target> {
        self.targets.get(u).and_then(OnceLock::get)
    }

    /// Where an HTTP request for upstream `u` goes.
    pub fn route<B>(&self, u: usize, req: &Request<B>, source: IpAddr) -> Option<&Target> {
        let tables = self.tables.load();
        let slot = match tables.fixed.get(u) {
            Some(&Some(slot)) => slot,
            _ => tables.pick(u, &RequestView::of(req, source), rand::random()),
        };
        self.target(slot)
    }

    /// Where a TCP connection for upstream `u` goes (routes without HTTP conditions only).
    pub fn route_tcp(&self, u: usize, source: IpAddr) -> Option<&Target> {
        let headers = HeaderMap::new();
        let view = RequestView {
            method: "",
            host: None,
            path: "",
            query: None,
            headers: &headers,
            source_ip: source,
        };
        let slot = self.tables.load().pick(u, &view, rand::random());
        self.target(slot)
    }
}

/// Compiles `[[outbound.routes]]` into one table per upstream. Errors name the key.
pub fn compile(outbound: &OutboundConfig) -> Result<RouteTables, ConfigError> {
    compile_with(outbound, &[])
}

/// [`compile`] onto the target slots of a running sidecar: the attribute subsets `known` keep their
/// slots (their clusters exist); any other a route names is added after them, up to
/// [`MAX_SUBSETS`] in all.
pub fn compile_with(
    outbound: &OutboundConfig,
    known: &[Subset],
) -> Result<RouteTables, ConfigError> {
    let ups = &outbound.upstreams;
    let position = |name: &str| ups.iter().position(|u| u.service.as_str() == name);
    let mut rules: Vec<Vec<Rule>> = vec![Vec::new(); ups.len()];
    let mut subsets: Vec<Subset> = known.to_vec();
    for (i, r) in outbound.routes.iter().enumerate() {
        // A pushed route is named by its service attribute (`trellis:route:v2`).
        let key = |field: &str| match r.name.as_deref() {
            Some(n) if n.starts_with(ROUTE_ATTRIBUTE_PREFIX) => format!("{n}{field}"),
            _ => format!("outbound.routes[{i}]{field}"),
        };
        let invalid = |field: &str, problem: String| ConfigError::Invalid {
            key: key(field),
            problem,
        };
        let Some(u) = position(r.upstream.as_str()) else {
            return Err(invalid(
                ".upstream",
                format!("`{}` is not in outbound.upstreams", r.upstream),
            ));
        };
        // What holds for any sidecar is checked where pushed routes are checked too (core).
        r.matches.check().map_err(|(f, p)| invalid(&f, p))?;
        check_targets(&r.targets).map_err(|(f, p)| invalid(&f, p))?;
        let conditions = conditions(&r.matches).map_err(|(f, p)| invalid(&f, p))?;
        if ups[u].protocol == Protocol::Tcp && !conditions.is_empty() {
            return Err(invalid(
                ".match",
                "a tcp upstream's routes can only split by weight (no HTTP match)".into(),
            ));
        }
        let prio = r
            .priority
            .unwrap_or(IMPLICIT_PRIORITY_BASE.saturating_add(i as u32));
        let priority = Priority::try_from(prio).map_err(|e| invalid(".priority", e.to_string()))?;
        rules[u].push(Rule {
            name: r
                .name
                .clone()
                .unwrap_or_else(|| format!("routes[{i}]"))
                .into(),
            priority,
            conditions,
            action: Action::Forward(
                forward(r, &position, ups.len(), &mut subsets).map_err(|(f, p)| invalid(&f, p))?,
            ),
        });
    }
    let tables = rules
        .into_iter()
        .enumerate()
        .map(|(u, rules)| {
            let own = WeightedGroup {
                name: ups[u].service.as_str().into(),
                slot: u,
                weight: Weight::try_from(1).unwrap_or_default(),
            };
            let default = Forward::new(vec![own], None).map_err(|e| ConfigError::Invalid {
                key: format!("outbound.upstreams[{u}]"),
                problem: e.to_string(),
            })?;
            RuleIndex::new(rules, Action::Forward(default)).map_err(|e| ConfigError::Invalid {
                key: "outbound.routes".into(),
                problem: format!("upstream `{}`: {e}", ups[u].service),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(RouteTables::new(tables, subsets))
}

type FieldError = (String, String);

/// How a subset is named in logs and `/clusters`: `api[version=v2]`.
pub fn subset_name(service: &str, attributes: &BTreeMap<String, String>) -> String {
    let attrs: Vec<String> = attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{service}[{}]", attrs.join(","))
}

/// The forward action of a route; attribute subsets get slots after the `n` upstreams.
fn forward(
    r: &RouteConfig,
    position: &dyn Fn(&str) -> Option<usize>,
    upstreams: usize,
    subsets: &mut Vec<Subset>,
) -> Result<Forward, FieldError> {
    let mut groups = Vec::with_capacity(r.targets.len());
    for (j, t) in r.targets.iter().enumerate() {
        let field = |f: &str| format!(".targets[{j}].{f}");
        let slot = position(t.cluster.as_str()).ok_or_else(|| {
            (
                field("cluster"),
                format!("`{}` is not in outbound.upstreams", t.cluster),
            )
        })?;
        let weight = Weight::try_from(t.weight).map_err(|e| (field("weight"), e.to_string()))?;
        let (slot, name) = if t.attributes.is_empty() {
            (slot, t.cluster.as_str().to_owned())
        } else {
            let subset = Subset {
                upstream: slot,
                attributes: t.attributes.clone(),
            };
            let i = match subsets.iter().position(|s| *s == subset) {
                Some(i) => i,
                None if subsets.len() >= MAX_SUBSETS => {
                    return Err((
                        field("attributes"),
                        format!(
                            "subset `{}` would be more than the {MAX_SUBSETS} attribute subsets a \
                             sidecar keeps (a subset stays until restart once made)",
                            subset_name(t.cluster.as_str(), &t.attributes)
                        ),
                    ));
                }
                None => {
                    subsets.push(subset);
                    subsets.len() - 1
                }
            };
            (
                upstreams + i,
                subset_name(t.cluster.as_str(), &t.attributes),
            )
        };
        groups.push(WeightedGroup {
            name: name.into(),
            slot,
            weight,
        });
    }
    Forward::new(groups, None).map_err(|e| (".targets".to_owned(), e.to_string()))
}

/// The conditions of a match that [`RouteMatch::check`] accepted.
fn conditions(m: &RouteMatch) -> Result<Vec<Condition>, FieldError> {
    let mut out = Vec::new();
    // `/` matches everything: no condition needed.
    if let Some(p) = m.prefix.as_ref().filter(|p| p.as_str() != "/") {
        out.push(Condition::PathPrefix(p.as_str().into()));
    }
    if let Some(p) = &m.path {
        out.push(Condition::PathExact(p.as_str().into()));
    }
    if let Some(p) = &m.path_regex {
        let re: RegexPattern = p
            .parse()
            .map_err(|e: crate::route::PatternError| (".match.path_regex".into(), e.to_string()))?;
        out.push(Condition::PathRegex(re));
    }
    if let Some(method) = &m.method {
        let parsed = Method::from_bytes(method.as_bytes()).map_err(|_| {
            (
                ".match.method".to_owned(),
                format!("`{method}` is not an uppercase HTTP method"),
            )
        })?;
        out.push(Condition::HttpRequestMethod(vec![parsed]));
    }
    for (k, h) in m.headers.iter().enumerate() {
        out.push(header(h).map_err(|(f, p)| (format!(".match.headers[{k}]{f}"), p))?);
    }
    Ok(out)
}

fn header(h: &HeaderMatchConfig) -> Result<Condition, FieldError> {
    let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
        (
            ".name".to_owned(),
            format!("`{}` is not a header name", h.name),
        )
    })?;
    let matcher = match (&h.exact, &h.prefix, &h.regex) {
        (Some(e), _, _) => HeaderMatch::Exact(e.as_str().into()),
        (_, Some(p), _) => HeaderMatch::Prefix(p.as_str().into()),
        (_, _, Some(r)) => HeaderMatch::Regex(
            r.parse()
                .map_err(|e: crate::route::PatternError| (".regex".to_owned(), e.to_string()))?,
        ),
        _ => HeaderMatch::Present,
    };
    Ok(Condition::Header {
        name,
        matcher,
        invert: h.invert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
[identity]
namespace = "my-app.local"
service = "web"

[outbound]
upstreams = [
  { service = "api", local_port = 0, danger_plaintext = true },
  { service = "api-v1", danger_plaintext = true },
  { service = "api-v2", danger_plaintext = true },
]

[[clusters]]
service = "api"
endpoints = [{ address = "127.0.0.1:1" }]
[[clusters]]
service = "api-v1"
endpoints = [{ address = "127.0.0.1:2" }]
[[clusters]]
service = "api-v2"
endpoints = [{ address = "127.0.0.1:3" }]
"#;

    fn with_routes(routes: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{BASE}\n{routes}"))
    }

    fn err(routes: &str) -> String {
        with_routes(routes).unwrap_err().to_string()
    }

    fn view<'a>(method: &'a str, path: &'a str, h: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            method,
            host: None,
            path,
            query: None,
            headers: h,
            source_ip: "127.0.0.1".parse().unwrap(),
        }
    }

    #[test]
    fn routes_compile_in_priority_order_with_default_to_own_cluster() {
        let c = with_routes(
            r#"
[[outbound.routes]]
upstream = "api"
match = { prefix = "/v2" }
targets = [{ cluster = "api-v2" }]

[[outbound.routes]]
upstream = "api"
priority = 5
match = { path = "/v2/pinned", method = "POST" }
targets = [{ cluster = "api-v1" }]
"#,
        )
        .unwrap();
        let t = compile(&c.outbound).unwrap();
        let h = HeaderMap::new();
        assert_eq!(t.pick(0, &view("GET", "/v2/x", &h), 0), 2);
        assert_eq!(t.pick(0, &view("POST", "/v2/pinned", &h), 0), 1);
        assert_eq!(t.pick(0, &view("GET", "/v2/pinned", &h), 0), 2);
        assert_eq!(t.pick(0, &view("GET", "/other", &h), 0), 0, "default");
        assert_eq!(t.pick(1, &view("GET", "/v2", &h), 0), 1, "no routes: own");
        // Upstreams without routes skip matching altogether; `api` has routes.
        assert_eq!(t.fixed, [None, Some(1), Some(2)]);
    }

    #[test]
    fn bad_routes_name_the_key() {
        let cases = [
            (
                "[[outbound.routes]]\nupstream = \"nope\"\ntargets = [{ cluster = \"api\" }]",
                "outbound.routes[0].upstream",
            ),
            (
                "[[outbound.routes]]\nupstream = \"api\"\ntargets = [{ cluster = \"zzz\" }]",
                "outbound.routes[0].targets[0].cluster",
            ),
            (
                "[[outbound.routes]]\nupstream = \"api\"\ntargets = [{ cluster = \"api\", weight = 1000 }]",
                "outbound.routes[0].targets[0].weight",
            ),
            (
                "[[outbound.routes]]\nupstream = \"api\"\ntargets = [{ cluster = \"api\", weight = 0 }]",
                "outbound.routes[0].targets",
            ),
            (
                "[[outbound.routes]]\nupstream = \"api\"\nmatch = { path_regex = \"/(\" }\ntargets = [{ cluster = \"api\" }]",
                "outbound.routes[0].match.path_regex",
            ),
            (
                "[[outbound.routes]]\nupstream = \"api\"\nmatch = { prefix = \"/a\", path = \"/b\" }\ntargets = [{ cluster = \"api\" }]",
                "outbound.routes[0].match",
            ),
            (
                "[[outbound.routes]]\nupstream = \"api\"\nmatch = { method = \"get\" }\ntargets = [{ cluster = \"api\" }]",
                "outbound.routes[0].match.method",
            ),
            (
                "[[outbound.routes]]\nupstream = \"api\"\nmatch = { headers = [{ name = \"x\" }] }\ntargets = [{ cluster = \"api\" }]",
                "outbound.routes[0].match.headers[0]",
            ),
            (
                "[[outbound.routes]]\nupstream = \"api\"\nmatch = { headers = [{ name = \"x y\", present = true }] }\ntargets = [{ cluster = \"api\" }]",
                "outbound.routes[0].match.headers[0].name",
            ),
            (
                "[[outbound.routes]]\nupstream = \"api\"\npriority = 0\ntargets = [{ cluster = \"api\" }]",
                "outbound.routes[0].priority",
            ),
            (
                "[[outbound.routes]]\nupstream = \"api\"\npriority = 3\ntargets = [{ cluster = \"api\" }]\n[[outbound.routes]]\nupstream = \"api\"\npriority = 3\ntargets = [{ cluster = \"api\" }]",
                "share priority 3",
            ),
            (
                "[[outbound.routes]]\nupstream = \"api\"\nmatchs = {}\ntargets = [{ cluster = \"api\" }]",
                "matchs",
            ),
        ];
        for (routes, want) in cases {
            let e = err(routes);
            assert!(e.contains(want), "{routes}\n→ {e}");
        }
    }

    #[test]
    fn attribute_subsets_get_slots_after_the_upstreams() {
        let c = with_routes(
            r#"
[[outbound.routes]]
upstream = "api"
match = { prefix = "/a" }
targets = [{ cluster = "api", attributes = { version = "v2" } }]

[[outbound.routes]]
upstream = "api-v1"
match = { prefix = "/b" }
targets = [{ cluster = "api", attributes = { version = "v2" } }, { cluster = "api-v2", attributes = { zone = "x" }, weight = 0 }]
"#,
        )
        .unwrap();
        let t = compile(&c.outbound).unwrap();
        assert_eq!(t.subsets().len(), 2, "the same subset is shared");
        assert_eq!(t.subsets()[0].upstream, 0);
        assert_eq!(t.subsets()[1].upstream, 2);
        let h = HeaderMap::new();
        assert_eq!(t.pick(0, &view("GET", "/a", &h), 0), 3);
        assert_eq!(t.pick(1, &view("GET", "/b", &h), u32::MAX), 3);
        assert_eq!(
            subset_name("api", &t.subsets()[0].attributes),
            "api[version=v2]"
        );
    }

    #[test]
    fn an_address_claimed_twice_is_named() {
        let text = BASE.replace(
            "{ service = \"api-v2\", danger_plaintext = true }",
            "{ service = \"api-v2\", danger_plaintext = true, addresses = [\"10.0.0.1\"] }",
        )
        .replace(
            "{ service = \"api-v1\", danger_plaintext = true }",
            "{ service = \"api-v1\", danger_plaintext = true, addresses = [\"10.0.0.2:80\", \"10.0.0.1\"] }",
        );
        let e = Config::from_toml(&text).unwrap_err().to_string();
        assert!(e.contains("outbound.upstreams[2].addresses[0]"), "{e}");
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let c = with_routes(
            "[[outbound.routes]]\nupstream = \"api\"\ntargets = [{ cluster = \"api-v1\", weight = 90 }, { cluster = \"api-v2\", weight = 10 }]",
        )
        .unwrap();
        let t = compile(&c.outbound).unwrap();
        let h = HeaderMap::new();
        let v2 = (0..10_000u32)
            .filter(|i| t.pick(0, &view("GET", "/", &h), i.wrapping_mul(429_497)) == 2)
            .count();
        assert!((900..1100).contains(&v2), "{v2}");
    }
}
