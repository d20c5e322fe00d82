//! A listener rule: a unique priority, conditions that must all match, and an action.

use std::sync::Arc;

use super::action::Action;
use super::condition::Condition;
use super::request::RequestView;

pub use trellis_core::route_spec::PRIORITY_RANGE;

/// A rule priority, 1–50000; lower is evaluated first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(u16);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("priority {0} is out of range 1-50000")]
pub struct PriorityError(pub u32);

impl TryFrom<u32> for Priority {
    type Error = PriorityError;
    fn try_from(v: u32) -> Result<Self, PriorityError> {
        if !PRIORITY_RANGE.contains(&v) {
            return Err(PriorityError(v));
        }
        Ok(Priority(v as u16))
    }
}

impl Priority {
    pub fn get(self) -> u32 {
        u32::from(self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: Arc<str>,
    pub priority: Priority,
    pub conditions: Vec<Condition>,
    pub action: Action,
}

impl Rule {
    /// All conditions match (a rule with none matches everything).
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.conditions.iter().all(|c| c.matches(req))
    }
}
