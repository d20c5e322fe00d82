//! The outbound routes in effect: the configured `[[outbound.routes]]`, except for upstreams whose
//! service carries routes pushed from the control plane (`trellis:route:<name>` service
//! attributes, see [`trellis_core::route_spec`]). Those replace the configured routes of that
//! upstream while they are present; when the last one is deleted, the configured ones apply again.
//!
//! Changes come from two sides, a reload and an upstream's watch, and are rare: they meet under a
//! mutex here, compile, and are swapped into the [`Router`] whole, which the request path only
//! loads. An attribute subset named for the first time (`{ cluster = "api", attributes = { version
//! = "v2" } }`) gets its cluster and target slot before the tables that use it are swapped in, and
//! starts from its upstream's last endpoint set, so its first requests find endpoints. Subset
//! clusters are fed by their upstream's watch (one watch per upstream). A push this sidecar cannot
//! apply (a target that is not one of its upstreams, more subsets than it keeps) is refused with a
//! warning and counted; the routes before it stay.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use trellis_core::EndpointSet;
use trellis_core::route_spec::{ROUTE_ATTRIBUTE_PREFIX, pushed_routes};

use crate::cluster::Cluster;
use crate::config::{OutboundConfig, RouteConfig};
use crate::error::ConfigError;
use crate::forward::Target;
use crate::metrics::Metrics;
use crate::outbound::{Router, Subset, compile_with};
use crate::watch::{self, WatchSink};

/// Makes the cluster of a new attribute subset: named, with its upstream's balancer and
/// resilience settings, holding a static upstream's endpoints, then given the endpoints the live
/// routes know (the second argument) before it is listed in the admin's `/clusters` (so readiness
/// never sees it empty). A watched upstream's subsets are fed here afterwards.
pub type SubsetClusters = Box<dyn Fn(&Subset, &dyn Fn(&Cluster)) -> Arc<Cluster> + Send + Sync>;

pub struct LiveRoutes {
    state: Mutex<State>,
    router: Arc<Router>,
    metrics: Metrics,
    /// What the admin's `/routes` shows: the routes in effect, by upstream.
    view: Arc<ArcSwap<String>>,
    make_cluster: SubsetClusters,
}

impl std::fmt::Debug for LiveRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state.lock();
        f.debug_struct("LiveRoutes")
            .field("pushed", &st.pushed)
            .field("subsets", &st.subsets.len())
            .finish_non_exhaustive()
    }
}

struct State {
    /// As configured (the latest reload).
    configured: OutboundConfig,
    /// By upstream position: the routes its service pushes, if any.
    pushed: Vec<Option<Vec<RouteConfig>>>,
    /// By upstream position: the route attributes last heard (applied or refused), so that a
    /// watch answer for other reasons (endpoints) does not redo or re-report them.
    heard: Vec<BTreeMap<String, String>>,
    /// The attribute subsets with a target slot, in slot order, and their clusters.
    subsets: Vec<(Subset, Arc<Cluster>)>,
    /// By upstream position: the endpoint set its watch brought last (a new subset starts there).
    last_sets: Vec<Option<EndpointSet>>,
}

impl State {
    /// The configured routes of upstreams without pushes, then the pushed ones.
    fn effective(&self) -> OutboundConfig {
        let pushed_for = |name: &str| {
            self.configured
                .upstreams
                .iter()
                .position(|u| u.service.as_str() == name)
                .and_then(|u| self.pushed.get(u))
                .is_some_and(Option::is_some)
        };
        let mut out = self.configured.clone();
        out.routes.retain(|r| !pushed_for(r.upstream.as_str()));
        out.routes
            .extend(self.pushed.iter().flatten().flatten().cloned());
        out
    }

    /// Compiles the routes in effect, makes the subsets they name for the first time, and swaps
    /// the tables in.
    fn compile_into(
        &mut self,
        router: &Router,
        view: &ArcSwap<String>,
        make_cluster: &SubsetClusters,
    ) -> Result<(), ConfigError> {
        let effective = self.effective();
        let known: Vec<Subset> = self.subsets.iter().map(|(s, _)| s.clone()).collect();
        let tables = compile_with(&effective, &known)?;
        for sub in tables.subsets().iter().skip(known.len()) {
            let Some(base) = router.target(sub.upstream).cloned() else {
                return Err(ConfigError::Invalid {
                    key: "outbound.routes".into(),
                    problem: format!("subset of upstream #{} which has no target", sub.upstream),
                });
            };
            let last = self.last_sets.get(sub.upstream).and_then(Option::as_ref);
            let seed = |cluster: &Cluster| match last {
                Some(set) => watch::apply(cluster, set),
                // Known to be empty (the control plane does not know the service).
                None if base.cluster.is_loaded() && !cluster.is_loaded() => {
                    cluster.update([], base.cluster.revision())
                }
                None => {}
            };
            let cluster = make_cluster(sub, &seed);
            let slot = self.subsets.len();
            let target = Target {
                cluster: Arc::clone(&cluster),
                ..base
            };
            if !router.add_subset(slot, target) {
                return Err(ConfigError::Invalid {
                    key: "outbound.routes".into(),
                    problem: format!("subset slot {slot} is taken"),
                });
            }
            tracing::info!(subset = %cluster.name(), "attribute subset added");
            self.subsets.push((sub.clone(), cluster));
        }
        router.swap(tables);
        view.store(Arc::new(self.view_json(&effective)));
        Ok(())
    }

    /// `{"api": {"source": "pushed", "routes": [...]}, ...}`, in upstream order.
    fn view_json(&self, effective: &OutboundConfig) -> String {
        let by_upstream: serde_json::Map<String, serde_json::Value> = effective
            .upstreams
            .iter()
            .enumerate()
            .map(|(u, up)| {
                let pushed = self.pushed.get(u).is_some_and(Option::is_some);
                let routes: Vec<&RouteConfig> = effective
                    .routes
                    .iter()
                    .filter(|r| r.upstream == up.service)
                    .collect();
                (
                    up.service.to_string(),
                    serde_json::json!({
                        "source": if pushed { "pushed" } else { "configured" },
                        "routes": routes,
                    }),
                )
            })
            .collect();
        serde_json::to_string_pretty(&by_upstream).unwrap_or_default()
    }
}

impl LiveRoutes {
    /// Compiles the configured routes onto `router` (whose slots hold the upstreams' targets),
    /// making the attribute subsets they name with `make_cluster`.
    pub fn new(
        configured: OutboundConfig,
        router: Arc<Router>,
        metrics: Metrics,
        view: Arc<ArcSwap<String>>,
        make_cluster: SubsetClusters,
    ) -> Result<Self, ConfigError> {
        let n = configured.upstreams.len();
        let mut state = State {
            configured,
            pushed: vec![None; n],
            heard: vec![BTreeMap::new(); n],
            subsets: Vec::new(),
            last_sets: vec![None; n],
        };
        state.compile_into(&router, &view, &make_cluster)?;
        Ok(Self {
            state: Mutex::new(state),
            router,
            metrics,
            view,
            make_cluster,
        })
    }

    /// The attribute subsets' clusters, with their upstream positions.
    pub fn subset_clusters(&self) -> Vec<(usize, Arc<Cluster>)> {
        let st = self.state.lock();
        st.subsets
            .iter()
            .map(|(s, c)| (s.upstream, Arc::clone(c)))
            .collect()
    }

    /// A reload's routes (same upstreams, else they are kept: the listeners and clusters are made
    /// at start). Pushed routes keep their upstreams.
    pub fn set_configured(&self, outbound: &OutboundConfig) -> Result<(), String> {
        let mut st = self.state.lock();
        let same_upstreams = outbound.upstreams.iter().map(|u| &u.service).eq(st
            .configured
            .upstreams
            .iter()
            .map(|u| &u.service));
        if !same_upstreams {
            return Err("outbound.upstreams changed: routes kept; restart to apply".into());
        }
        let before = std::mem::replace(&mut st.configured, outbound.clone());
        if let Err(e) = st.compile_into(&self.router, &self.view, &self.make_cluster) {
            st.configured = before;
            return Err(e.to_string());
        }
        Ok(())
    }

    /// Upstream `u`'s watch brought `set`: its subsets' endpoints, and the routes its service
    /// pushes (the set's attributes).
    pub fn upstream_set(&self, u: usize, set: &EndpointSet) {
        let mut st = self.state.lock();
        if let Some(last) = st.last_sets.get_mut(u) {
            *last = Some(set.clone());
        }
        for (_, cluster) in st.subsets.iter().filter(|(s, _)| s.upstream == u) {
            watch::apply(cluster, set);
        }
        self.set_pushed(&mut st, u, &set.attributes);
    }

    /// The control plane does not know upstream `u`'s service (yet).
    pub fn upstream_unknown(&self, u: usize) {
        let st = self.state.lock();
        for (_, cluster) in st.subsets.iter().filter(|(s, _)| s.upstream == u) {
            WatchSink::unknown(&**cluster);
        }
    }

    /// What upstream `u`'s service pushes now (its endpoint set's attributes).
    fn set_pushed(&self, st: &mut State, u: usize, attributes: &BTreeMap<String, String>) {
        let Some(upstream) = st.configured.upstreams.get(u).map(|c| c.service.clone()) else {
            return;
        };
        let heard: BTreeMap<String, String> = attributes
            .iter()
            .filter(|(k, _)| k.starts_with(ROUTE_ATTRIBUTE_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match st.heard.get_mut(u) {
            Some(h) if *h == heard => return,
            Some(h) => *h = heard,
            None => return,
        }
        let routes = match pushed_routes(attributes.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            Ok(r) => r.map(|routes| {
                routes
                    .into_iter()
                    .map(|(name, r)| RouteConfig {
                        upstream: upstream.clone(),
                        name: Some(format!("{ROUTE_ATTRIBUTE_PREFIX}{name}")),
                        priority: r.priority,
                        matches: r.matches,
                        targets: r.targets,
                    })
                    .collect::<Vec<_>>()
            }),
            // The control plane checks routes when they are set; an older one may not have.
            Err(e) => {
                self.refuse(upstream.as_str(), &e);
                return;
            }
        };
        if st.pushed.get(u) == Some(&routes) {
            return;
        }
        let before = std::mem::replace(&mut st.pushed[u], routes);
        match st.compile_into(&self.router, &self.view, &self.make_cluster) {
            Ok(()) => {
                let n = st.pushed.iter().flatten().map(Vec::len).sum::<usize>();
                self.metrics.pushed_routes.set(n as i64);
                match &st.pushed[u] {
                    Some(r) => tracing::info!(%upstream, routes = r.len(), "pushed routes applied"),
                    None => {
                        tracing::info!(%upstream, "pushed routes withdrawn: configured routes apply")
                    }
                }
            }
            Err(e) => {
                st.pushed[u] = before;
                self.refuse(upstream.as_str(), &e.to_string());
            }
        }
    }

    fn refuse(&self, upstream: &str, problem: &str) {
        self.metrics.pushed_routes_rejected.inc();
        tracing::warn!(%upstream, %problem, "pushed routes refused; the routes before them stay");
    }
}

/// An upstream's watch: endpoints to its cluster and its subsets', pushed routes to the live
/// routes.
pub struct UpstreamSink {
    pub cluster: Arc<Cluster>,
    pub routes: Arc<LiveRoutes>,
    pub upstream: usize,
}

impl WatchSink for UpstreamSink {
    fn apply(&self, set: &EndpointSet) {
        self.cluster.apply(set);
        self.routes.upstream_set(self.upstream, set);
    }
    fn is_loaded(&self) -> bool {
        WatchSink::is_loaded(&*self.cluster)
    }
    fn unknown(&self) {
        self.cluster.unknown();
        self.routes.upstream_unknown(self.upstream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn outbound(routes: &str) -> OutboundConfig {
        let toml = format!(
            "[identity]\nnamespace = \"my-app.local\"\nservice = \"web\"\n\n[outbound]\nupstreams = [{{ service = \"api\", danger_plaintext = true }}, {{ service = \"api-v2\", danger_plaintext = true }}, {{ service = \"users\", danger_plaintext = true }}]\n{routes}\n[control_plane]\naddress = \"127.0.0.1:9400\"\n"
        );
        Config::from_toml(&toml).unwrap().outbound
    }

    #[test]
    fn pushed_routes_replace_the_configured_ones_of_their_upstream_only() {
        let configured = outbound(
            "[[outbound.routes]]\nupstream = \"api\"\nmatch = { prefix = \"/old\" }\ntargets = [{ cluster = \"api-v2\" }]\n\n[[outbound.routes]]\nupstream = \"users\"\nmatch = { prefix = \"/u\" }\ntargets = [{ cluster = \"api\" }]\n",
        );
        let pushed = pushed_routes([(
            "trellis:route:v2",
            r#"{"match":{"prefix":"/v2"},"targets":[{"cluster":"api-v2"}]}"#,
        )])
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|(name, r)| RouteConfig {
            upstream: "api".parse().unwrap(),
            name: Some(format!("{ROUTE_ATTRIBUTE_PREFIX}{name}")),
            priority: r.priority,
            matches: r.matches,
            targets: r.targets,
        })
        .collect();
        let st = State {
            configured,
            pushed: vec![Some(pushed), None, None],
            heard: vec![BTreeMap::new(); 3],
            subsets: Vec::new(),
            last_sets: vec![None; 3],
        };
        let eff = st.effective();
        let got: Vec<(&str, Option<&str>)> = eff
            .routes
            .iter()
            .map(|r| (r.upstream.as_str(), r.matches.prefix.as_deref()))
            .collect();
        assert_eq!(got, [("users", Some("/u")), ("api", Some("/v2"))]);
        assert!(compile_with(&eff, &[]).is_ok());

        // A push naming a target this sidecar lacks names the attribute.
        let mut bad = eff.clone();
        bad.routes[1].targets[0].cluster = "billing".parse().unwrap();
        let err = compile_with(&bad, &[]).unwrap_err().to_string();
        assert!(err.contains("trellis:route:v2.targets[0].cluster"), "{err}");
        // A subset named for the first time gets the slot after the known ones...
        let mut sub = eff;
        sub.routes[1].targets[0]
            .attributes
            .insert("version".into(), "v3".into());
        let v3 = Subset {
            upstream: 1,
            attributes: [("version".to_owned(), "v3".to_owned())].into(),
        };
        let known: Vec<Subset> = (0..3)
            .map(|i| Subset {
                upstream: 0,
                attributes: [("zone".to_owned(), i.to_string())].into(),
            })
            .collect();
        let t = compile_with(&sub, &known).unwrap();
        assert_eq!(t.subsets()[..3], known[..]);
        assert_eq!(t.subsets()[3..], *std::slice::from_ref(&v3));
        // ...up to the most a sidecar keeps; then the push is refused, naming the attribute.
        let full: Vec<Subset> = (0..crate::outbound::MAX_SUBSETS)
            .map(|i| Subset {
                upstream: 0,
                attributes: [("zone".to_owned(), i.to_string())].into(),
            })
            .collect();
        let err = compile_with(&sub, &full).unwrap_err().to_string();
        assert!(
            err.contains("trellis:route:v2.targets[0].attributes")
                && err.contains("api-v2[version=v3]")
                && err.contains("64"),
            "{err}"
        );
        let mut again = full.clone();
        again[5] = v3;
        assert!(compile_with(&sub, &again).is_ok(), "a known one is fine");
    }
}
