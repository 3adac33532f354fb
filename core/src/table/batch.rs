//! Table changes, applied together as one atomic batch.

use crate::model::{Endpoint, Service};

/// One change to a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Adds a service, or replaces its definition (its endpoints stay).
    Upsert(Service),
    /// Removes a service and its endpoints.
    Remove(String),
    /// Replaces every endpoint of a service.
    ReplaceEndpoints {
        /// Service name.
        service: String,
        /// The new endpoint list.
        endpoints: Vec<Endpoint>,
    },
}

/// Changes applied in order and published as one snapshot, or not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub(crate) changes: Vec<Change>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a change.
    pub fn push(&mut self, change: Change) {
        self.changes.push(change);
    }

    /// Adds or replaces a service.
    pub fn upsert(mut self, service: Service) -> Self {
        self.push(Change::Upsert(service));
        self
    }

    /// Removes a service.
    pub fn remove(mut self, service: impl Into<String>) -> Self {
        self.push(Change::Remove(service.into()));
        self
    }

    /// Replaces a service's endpoints.
    pub fn replace_endpoints(
        mut self,
        service: impl Into<String>,
        endpoints: Vec<Endpoint>,
    ) -> Self {
        self.push(Change::ReplaceEndpoints {
            service: service.into(),
            endpoints,
        });
        self
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// Whether there are no changes.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The changes, in order.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }
}

impl From<Change> for Batch {
    fn from(change: Change) -> Self {
        Self {
            changes: vec![change],
        }
    }
}

impl FromIterator<Change> for Batch {
    fn from_iter<I: IntoIterator<Item = Change>>(iter: I) -> Self {
        Self {
            changes: iter.into_iter().collect(),
        }
    }
}
