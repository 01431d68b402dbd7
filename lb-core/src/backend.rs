//! Backend sets: stable names, addresses and weights.
//!
//! A set is kept sorted by name, so a backend's [`BackendId`] and the Maglev
//! table built over the set do not depend on the order the config listed them in.

use std::net::SocketAddr;

/// Index of a backend within its [`BackendSet`] (and the snapshot built from it).
pub type BackendId = u32;

/// One backend as configured.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackendSpec {
    /// Stable identity: the Maglev permutation is derived from it.
    pub name: String,
    pub addr: SocketAddr,
    /// Relative share of new flows; 0 means draining: no new flows, established ones continue.
    pub weight: u32,
}

impl BackendSpec {
    pub fn new(name: impl Into<String>, addr: SocketAddr, weight: u32) -> Self {
        BackendSpec {
            name: name.into(),
            addr,
            weight,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("backend name `{0}` is used more than once")]
    DuplicateName(String),
    #[error("backend name must not be empty")]
    EmptyName,
    #[error("{count} backends is more than the {max} a table can address")]
    TooMany { count: usize, max: usize },
}

/// Backends sorted by name, with unique names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendSet {
    backends: Vec<BackendSpec>,
}

impl BackendSet {
    /// Most backends a set may hold; ids must stay below the table's empty-slot marker.
    pub const MAX_BACKENDS: usize = crate::maglev::MAX_TABLE_BACKENDS;

    pub fn new(mut backends: Vec<BackendSpec>) -> Result<Self, BackendError> {
        if backends.len() > Self::MAX_BACKENDS {
            return Err(BackendError::TooMany {
                count: backends.len(),
                max: Self::MAX_BACKENDS,
            });
        }
        if backends.iter().any(|b| b.name.is_empty()) {
            return Err(BackendError::EmptyName);
        }
        backends.sort_by(|a, b| a.name.cmp(&b.name));
        for pair in backends.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(BackendError::DuplicateName(pair[0].name.clone()));
            }
        }
        Ok(BackendSet { backends })
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    pub fn get(&self, id: BackendId) -> Option<&BackendSpec> {
        self.backends.get(id as usize)
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &BackendSpec> {
        self.backends.iter()
    }

    pub fn as_slice(&self) -> &[BackendSpec] {
        &self.backends
    }

    pub fn id_of(&self, name: &str) -> Option<BackendId> {
        self.backends
            .binary_search_by(|b| b.name.as_str().cmp(name))
            .ok()
            .map(|i| i as BackendId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, port: u16) -> BackendSpec {
        BackendSpec::new(name, SocketAddr::from(([127, 0, 0, 1], port)), 1)
    }

    #[test]
    fn order_of_the_input_does_not_matter() {
        let a = BackendSet::new(vec![spec("b", 2), spec("a", 1), spec("c", 3)]).unwrap();
        let b = BackendSet::new(vec![spec("c", 3), spec("b", 2), spec("a", 1)]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.id_of("b"), Some(1));
        assert_eq!(a.id_of("zz"), None);
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let err = BackendSet::new(vec![spec("a", 1), spec("a", 2)]).unwrap_err();
        assert_eq!(err, BackendError::DuplicateName("a".into()));
    }
}
