//! What a matched rule does: forward to weighted target groups, answer fixed, or redirect.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::pattern::strip_port;
use super::request::RequestView;

/// Cookie that pins a client to the target group it was first sent to.
pub const STICKY_COOKIE: &str = "TRELLISTG";
/// Largest fixed-response body, as ALB.
pub const MAX_FIXED_BODY: usize = 1024;
pub use trellis_core::route_spec::MAX_WEIGHT;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ActionError {
    #[error("weight {0} is out of range 0-{MAX_WEIGHT}")]
    WeightRange(u32),
    #[error("all target group weights are zero")]
    AllWeightsZero,
    #[error("forward action has no target group")]
    NoTargetGroup,
    #[error("status {0} is not allowed here")]
    Status(u16),
    #[error("body is longer than {MAX_FIXED_BODY} bytes")]
    BodyTooLong,
    #[error(
        "unknown placeholder in {0:?} (allowed: #{{protocol}} #{{host}} #{{port}} #{{path}} #{{query}})"
    )]
    Placeholder(String),
    #[error("redirect path must start with '/'")]
    RedirectPath,
}

/// A target-group weight, 0–999.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Weight(u16);

impl Weight {
    pub fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u32> for Weight {
    type Error = ActionError;
    fn try_from(v: u32) -> Result<Self, ActionError> {
        if v > u32::from(MAX_WEIGHT) {
            return Err(ActionError::WeightRange(v));
        }
        Ok(Weight(v as u16))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedGroup {
    pub name: Arc<str>,
    /// Position in the front end's target-group table, resolved when the rules are compiled.
    pub slot: usize,
    pub weight: Weight,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    groups: Vec<WeightedGroup>,
    total: u32,
    /// Cookie lifetime when group stickiness is on.
    pub stickiness: Option<Duration>,
}

/// The group a forward action chose and whether the client must be told (`Set-Cookie`).
#[derive(Debug, Clone, Copy)]
pub struct GroupPick<'a> {
    pub group: &'a WeightedGroup,
    pub set_cookie: bool,
}

impl Forward {
    pub fn new(
        groups: Vec<WeightedGroup>,
        stickiness: Option<Duration>,
    ) -> Result<Self, ActionError> {
        if groups.is_empty() {
            return Err(ActionError::NoTargetGroup);
        }
        let total = groups.iter().map(|g| u32::from(g.weight.get())).sum();
        if total == 0 {
            return Err(ActionError::AllWeightsZero);
        }
        Ok(Self {
            groups,
            total,
            stickiness,
        })
    }

    pub fn groups(&self) -> &[WeightedGroup] {
        &self.groups
    }

    /// The same action with new weights by group name; groups not named keep theirs.
    pub fn with_weights(&self, weights: &[(&str, Weight)]) -> Result<Self, ActionError> {
        let groups = self
            .groups
            .iter()
            .map(|g| {
                let w = weights
                    .iter()
                    .find(|(n, _)| *n == &*g.name)
                    .map_or(g.weight, |(_, w)| *w);
                WeightedGroup {
                    weight: w,
                    ..g.clone()
                }
            })
            .collect();
        Self::new(groups, self.stickiness)
    }

    /// Weighted choice with `rnd` uniform in `0..u32::MAX`; a sticky cookie naming a group with
    /// non-zero weight wins.
    pub fn pick(&self, headers: &HeaderMap, rnd: u32) -> GroupPick<'_> {
        if self.stickiness.is_some()
            && let Some(name) = cookie_value(headers, STICKY_COOKIE)
            && let Some(g) = self
                .groups
                .iter()
                .find(|g| &*g.name == name && g.weight.get() > 0)
        {
            return GroupPick {
                group: g,
                set_cookie: false,
            };
        }
        let mut r = ((u64::from(rnd) * u64::from(self.total)) >> 32) as u32;
        let mut chosen = &self.groups[0];
        for g in &self.groups {
            let w = u32::from(g.weight.get());
            if r < w {
                chosen = g;
                break;
            }
            r -= w;
        }
        GroupPick {
            group: chosen,
            set_cookie: self.stickiness.is_some(),
        }
    }
}

/// The value of cookie `name` in any `Cookie` header, borrowed.
pub fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedResponse {
    pub status: StatusCode,
    pub content_type: Option<Box<str>>,
    pub body: Bytes,
}

impl FixedResponse {
    pub fn new(status: u16, content_type: Option<&str>, body: &str) -> Result<Self, ActionError> {
        if !(200..=599).contains(&status) {
            return Err(ActionError::Status(status));
        }
        let status = StatusCode::from_u16(status).map_err(|_| ActionError::Status(status))?;
        if body.len() > MAX_FIXED_BODY {
            return Err(ActionError::BodyTooLong);
        }
        Ok(Self {
            status,
            content_type: content_type.map(Into::into),
            body: Bytes::copy_from_slice(body.as_bytes()),
        })
    }
}

/// A redirect; each part is a template with `#{protocol}`, `#{host}`, `#{port}`, `#{path}`
/// (with its leading `/`) and `#{query}` (without `?`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub status: StatusCode,
    protocol: Box<str>,
    host: Box<str>,
    port: Box<str>,
    path: Box<str>,
    query: Box<str>,
}

/// Parts of a redirect as written in config; `None` keeps the request's own.
#[derive(Debug, Clone, Default)]
pub struct RedirectParts<'a> {
    pub protocol: Option<&'a str>,
    pub host: Option<&'a str>,
    pub port: Option<&'a str>,
    pub path: Option<&'a str>,
    pub query: Option<&'a str>,
}

const PLACEHOLDERS: [&str; 5] = ["#{protocol}", "#{host}", "#{port}", "#{path}", "#{query}"];

impl Redirect {
    pub fn new(status: u16, parts: RedirectParts<'_>) -> Result<Self, ActionError> {
        let status = match status {
            301 => StatusCode::MOVED_PERMANENTLY,
            302 => StatusCode::FOUND,
            other => return Err(ActionError::Status(other)),
        };
        let tpl = |v: Option<&str>, default: &str| -> Result<Box<str>, ActionError> {
            let v = v.unwrap_or(default);
            let mut rest = v;
            while let Some(i) = rest.find("#{") {
                let tail = &rest[i..];
                match PLACEHOLDERS.iter().find(|p| tail.starts_with(**p)) {
                    Some(p) => rest = &tail[p.len()..],
                    None => return Err(ActionError::Placeholder(v.to_owned())),
                }
            }
            Ok(v.into())
        };
        let path = tpl(parts.path, "#{path}")?;
        if !(path.starts_with('/') || path.starts_with("#{path}")) {
            return Err(ActionError::RedirectPath);
        }
        Ok(Self {
            status,
            protocol: tpl(parts.protocol, "#{protocol}")?,
            host: tpl(parts.host, "#{host}")?,
            port: tpl(parts.port, "#{port}")?,
            path,
            query: tpl(parts.query, "#{query}")?,
        })
    }

    /// The `Location` for `req` received over `scheme` on `local_port`.
    pub fn location(&self, req: &RequestView<'_>, scheme: &str, local_port: u16) -> String {
        let host_full = req.host.unwrap_or("");
        let host = strip_port(host_full);
        let port_buf = local_port.to_string();
        let port = host_full
            .strip_prefix(host)
            .and_then(|p| p.strip_prefix(':'))
            .unwrap_or(&port_buf);
        let vals = [scheme, host, port, req.path, req.query.unwrap_or("")];
        let fill = |t: &str| {
            let mut out = String::with_capacity(t.len() + 16);
            let mut rest = t;
            while let Some(i) = rest.find("#{") {
                out.push_str(&rest[..i]);
                let tail = &rest[i..];
                match PLACEHOLDERS.iter().position(|p| tail.starts_with(*p)) {
                    Some(k) => {
                        out.push_str(vals[k]);
                        rest = &tail[PLACEHOLDERS[k].len()..];
                    }
                    None => {
                        out.push_str("#{");
                        rest = &tail[2..];
                    }
                }
            }
            out.push_str(rest);
            out
        };
        let protocol = fill(&self.protocol).to_ascii_lowercase();
        let port = fill(&self.port);
        let default_port = matches!(
            (protocol.as_str(), port.as_str()),
            ("http", "80") | ("https", "443")
        );
        let mut loc = format!("{protocol}://{}", fill(&self.host));
        if !default_port && !port.is_empty() {
            let _ = write!(loc, ":{port}");
        }
        loc.push_str(&fill(&self.path));
        let query = fill(&self.query);
        if !query.is_empty() {
            loc.push('?');
            loc.push_str(&query);
        }
        loc
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Forward(Forward),
    FixedResponse(FixedResponse),
    Redirect(Redirect),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, w: u32) -> WeightedGroup {
        WeightedGroup {
            name: name.into(),
            slot: 0,
            weight: Weight::try_from(w).unwrap(),
        }
    }

    #[test]
    fn weights_validate() {
        assert_eq!(Weight::try_from(1000), Err(ActionError::WeightRange(1000)));
        assert_eq!(
            Forward::new(vec![group("a", 0), group("b", 0)], None),
            Err(ActionError::AllWeightsZero)
        );
        assert_eq!(Forward::new(vec![], None), Err(ActionError::NoTargetGroup));
    }

    #[test]
    fn weighted_pick_spans_the_range() {
        let f = Forward::new(vec![group("a", 1), group("b", 0), group("c", 3)], None).unwrap();
        let h = HeaderMap::new();
        let mut counts = [0u32; 3];
        for i in 0..4000u32 {
            let rnd = i.wrapping_mul(1_073_807); // spread over u32
            let g = f
                .pick(&h, (u64::from(rnd) * 1_000_003 % (1u64 << 32)) as u32)
                .group;
            counts[["a", "b", "c"].iter().position(|n| *n == &*g.name).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!(counts[2] > 2 * counts[0], "{counts:?}");
        assert_eq!(f.pick(&h, 0).group.name.as_ref(), "a");
        assert_eq!(f.pick(&h, u32::MAX).group.name.as_ref(), "c");
    }

    #[test]
    fn stickiness_honours_cookie_with_weight() {
        let f = Forward::new(
            vec![group("blue", 1), group("green", 1), group("old", 0)],
            Some(Duration::from_secs(60)),
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=b; TRELLISTG=green".parse().unwrap());
        let p = f.pick(&h, 0);
        assert_eq!(&*p.group.name, "green");
        assert!(!p.set_cookie);
        h.insert("cookie", "TRELLISTG=old".parse().unwrap());
        let p = f.pick(&h, 0);
        assert_eq!(&*p.group.name, "blue");
        assert!(p.set_cookie);
    }

    #[test]
    fn redirect_placeholders() {
        let h = HeaderMap::new();
        let req = RequestView {
            method: "GET",
            host: Some("old.example.com:8080"),
            path: "/a/b",
            query: Some("x=1"),
            headers: &h,
            source_ip: "127.0.0.1".parse().unwrap(),
        };
        let r = Redirect::new(301, RedirectParts::default()).unwrap();
        assert_eq!(
            r.location(&req, "http", 8080),
            "http://old.example.com:8080/a/b?x=1"
        );
        let r = Redirect::new(
            302,
            RedirectParts {
                protocol: Some("https"),
                host: Some("new.#{host}"),
                port: Some("443"),
                path: Some("/v2#{path}"),
                query: Some("#{query}&from=old"),
            },
        )
        .unwrap();
        assert_eq!(
            r.location(&req, "http", 8080),
            "https://new.old.example.com/v2/a/b?x=1&from=old"
        );
        assert!(matches!(
            Redirect::new(307, RedirectParts::default()),
            Err(ActionError::Status(307))
        ));
        assert!(matches!(
            Redirect::new(
                301,
                RedirectParts {
                    host: Some("#{bogus}"),
                    ..Default::default()
                }
            ),
            Err(ActionError::Placeholder(_))
        ));
        assert!(matches!(
            Redirect::new(
                301,
                RedirectParts {
                    path: Some("x"),
                    ..Default::default()
                }
            ),
            Err(ActionError::RedirectPath)
        ));
    }

    #[test]
    fn fixed_response_limits() {
        assert!(FixedResponse::new(200, Some("text/plain"), "ok").is_ok());
        assert_eq!(
            FixedResponse::new(99, None, ""),
            Err(ActionError::Status(99))
        );
        assert_eq!(
            FixedResponse::new(200, None, &"x".repeat(2000)),
            Err(ActionError::BodyTooLong)
        );
    }
}
