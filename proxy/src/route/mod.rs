//! The routing engine shared by the sidecar's outbound routes and the load balancer: ALB
//! conditions, wildcard patterns, the compiled rule index and weighted, sticky target-group
//! picks. Pure logic: no I/O, no clocks.

mod action;
mod condition;
mod index;
mod pattern;
mod request;
mod rule;

pub use action::{
    Action, ActionError, FixedResponse, Forward, GroupPick, MAX_FIXED_BODY, MAX_WEIGHT, Redirect,
    RedirectParts, STICKY_COOKIE, Weight, WeightedGroup, cookie_value,
};
pub use condition::{Condition, HeaderMatch, MAX_VALUES, QueryMatch};
pub use index::{IndexError, Matched, RuleIndex};
pub use pattern::{
    Case, HostPattern, MAX_PATTERN_LEN, MAX_REGEX_LEN, PathPattern, PatternError, RegexPattern,
    Wildcard,
};
pub use request::RequestView;
pub use rule::{PRIORITY_RANGE, Priority, PriorityError, Rule};
