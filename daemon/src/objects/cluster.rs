//! The objects of a cluster as the Kubernetes API reports them, kept event by event: each
//! change ([`Cluster::apply`], [`Cluster::delete`], the end of a relist) returns the services
//! it touched, and [`Cluster::service`] maps one of them, with its EndpointSlices, to what is
//! served, by the same mapping as the manifest files.
//!
//! An object that cannot be used is set aside with its error, and its last good state (if
//! any) stays; one that svcproxyd does not serve (an FQDN slice) is counted and forgotten.
//! A relist ([`Cluster::listing`], then [`Cluster::listed`]) forgets the objects of its kind
//! that the new list no longer holds, as if each had been deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::SystemTime;

use svcproxy_core::schema::ServiceDoc;

use super::{Item, ManifestError, Node, Notes, RawService, Slice, api_item, service};

/// The kinds watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

/// An object's namespace and name (a Node's namespace is empty).
pub type Key = (String, String);

/// What the API holds, as svcproxyd keeps it.
#[derive(Default)]
pub struct Cluster {
    services: HashMap<Key, RawService>,
    slices: HashMap<Key, Slice>,
    /// The slices of each service (by the service's key), by name.
    slices_of: HashMap<Key, BTreeSet<String>>,
    nodes: BTreeMap<String, Node>,
    /// Objects that cannot be used, each with its error.
    invalid: BTreeMap<(Kind, Key), String>,
    /// Objects not served here (each was warned about).
    not_served: BTreeSet<(Kind, Key)>,
    /// Warnings about objects served (an SCTP port left out, say), by object.
    warnings: BTreeMap<(Kind, Key), Vec<String>>,
    /// For each kind being relisted, the objects listed so far.
    listing: HashMap<Kind, HashSet<Key>>,
}

/// The key of the object `value` names (`None` without a name).
fn key_of(value: &serde_norway::Value) -> Option<Key> {
    let metadata = value.get("metadata")?;
    let text = |field: &str| metadata.get(field).and_then(|v| v.as_str());
    let name = text("name")?.to_string();
    Some((text("namespace").unwrap_or_default().to_string(), name))
}

impl Cluster {
    /// Starts a relist of `kind`: what [`Cluster::listed`] finds unlisted is then forgotten.
    pub fn listing(&mut self, kind: Kind) {
        self.listing.insert(kind, HashSet::new());
    }

    /// Ends the relist of `kind`: each object of it not listed since [`Cluster::listing`] is
    /// deleted; returns the services that touched.
    pub fn listed(&mut self, kind: Kind) -> BTreeSet<Key> {
        let Some(listed) = self.listing.remove(&kind) else {
            return BTreeSet::new();
        };
        let held: Vec<Key> = match kind {
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::Node => self
                .nodes
                .keys()
                .map(|n| (String::new(), n.clone()))
                .collect(),
        };
        let set_aside = self
            .invalid
            .keys()
            .chain(self.warnings.keys())
            .chain(&self.not_served)
            .filter(|(k, _)| *k == kind)
            .map(|(_, key)| key.clone());
        let gone: BTreeSet<Key> = held
            .into_iter()
            .chain(set_aside)
            .filter(|key| !listed.contains(key))
            .collect();
        gone.into_iter()
            .flat_map(|key| self.forget(kind, &key))
            .collect()
    }

    /// Records the object `value` of `kind` as the API has it now; returns the services that
    /// touched (one, or, for a slice moved from one service to another, both).
    pub fn apply(&mut self, kind: Kind, value: serde_norway::Value) -> BTreeSet<Key> {
        let Some(key) = key_of(&value) else {
            return BTreeSet::new();
        };
        if let Some(listed) = self.listing.get_mut(&kind) {
            listed.insert(key.clone());
        }
        let mut notes = Notes::default();
        let item = api_item(value, &mut notes);
        let id = (kind, key.clone());
        if let Err(e) = item {
            // Its last good state stays.
            self.invalid.insert(id, e.to_string());
            return BTreeSet::new();
        }
        self.invalid.remove(&id);
        let mut touched = self.forget(kind, &key);
        if notes.left_out > 0 {
            self.not_served.insert(id.clone());
        }
        if !notes.warnings.is_empty() {
            self.warnings.insert(id, notes.warnings);
        }
        match item {
            Ok(Some(Item::Service(raw))) => {
                self.services.insert(key.clone(), raw);
                touched.insert(key);
            }
            Ok(Some(Item::Slice(slice))) => {
                let of = (slice.namespace.clone(), slice.service.clone());
                self.slices_of
                    .entry(of.clone())
                    .or_default()
                    .insert(slice.name.clone());
                self.slices.insert(key, slice);
                touched.insert(of);
            }
            Ok(Some(Item::Node(name, node))) => {
                self.nodes.insert(name, node);
            }
            Ok(None) | Err(_) => {}
        }
        touched
    }

    /// Forgets the object of `kind` at `key` (deleted); returns the services that touched.
    pub fn delete(&mut self, kind: Kind, value: &serde_norway::Value) -> BTreeSet<Key> {
        key_of(value).map_or_else(BTreeSet::new, |key| self.forget(kind, &key))
    }

    /// Drops every trace of the object of `kind` at `key`; returns the services that touched.
    fn forget(&mut self, kind: Kind, key: &Key) -> BTreeSet<Key> {
        let id = (kind, key.clone());
        self.invalid.remove(&id);
        self.not_served.remove(&id);
        self.warnings.remove(&id);
        let mut touched = BTreeSet::new();
        match kind {
            Kind::Service => {
                if self.services.remove(key).is_some() {
                    touched.insert(key.clone());
                }
            }
            Kind::EndpointSlice => {
                if let Some(old) = self.slices.remove(key) {
                    let of = (old.namespace, old.service);
                    if let Some(names) = self.slices_of.get_mut(&of) {
                        names.remove(&old.name);
                        if names.is_empty() {
                            self.slices_of.remove(&of);
                        }
                    }
                    touched.insert(of);
                }
            }
            Kind::Node => {
                self.nodes.remove(&key.1);
            }
        }
        touched
    }

    /// What the service at `key` is now: `Ok(None)` when there is none to serve (deleted,
    /// headless, without a port served here), with warnings added to `notes`; an error names
    /// the field of the Service that cannot be used.
    pub fn service(
        &self,
        key: &Key,
        notes: &mut Notes,
    ) -> Result<Option<(ServiceDoc, Option<SystemTime>)>, ManifestError> {
        let Some(raw) = self.services.get(key) else {
            return Ok(None);
        };
        let slices: Vec<&Slice> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&(key.0.clone(), name.clone())))
            .collect();
        let triggered = slices.iter().filter_map(|s| s.triggered).max();
        Ok(service(raw, &slices, notes)?.map(|doc| (doc, triggered)))
    }

    /// The Node called `name`, if the API has it.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// The objects that cannot be used, each with its error.
    pub fn invalid(&self) -> impl Iterator<Item = &str> {
        self.invalid.values().map(String::as_str)
    }

    /// The warnings about objects held.
    pub fn warnings(&self) -> impl Iterator<Item = &str> {
        self.warnings.values().flatten().map(String::as_str)
    }

    /// How many objects are not served here.
    pub fn not_served(&self) -> usize {
        self.not_served.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> serde_norway::Value {
        serde_norway::from_str(yaml).unwrap()
    }

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 198.18.0.10, ports: [{port: 80}]}";

    fn slice(name: &str, service: &str, ip: &str) -> serde_norway::Value {
        doc(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{ip}]}}]"
        ))
    }

    fn key(name: &str) -> Key {
        ("shop".into(), name.into())
    }

    fn addresses(c: &Cluster, name: &str) -> Vec<String> {
        let found = c.service(&key(name), &mut Notes::default()).unwrap();
        found
            .map(|(d, _)| {
                d.endpoints
                    .unwrap()
                    .into_iter()
                    .map(|e| e.address)
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn each_change_touches_its_services_and_a_moved_slice_both() {
        let mut c = Cluster::default();
        assert_eq!(
            c.apply(Kind::Service, doc(WEB)),
            BTreeSet::from([key("web")])
        );
        let touched = c.apply(Kind::EndpointSlice, slice("s1", "web", "198.18.1.1"));
        assert_eq!(touched, BTreeSet::from([key("web")]));
        assert_eq!(addresses(&c, "web"), ["198.18.1.1"]);
        let moved = c.apply(Kind::EndpointSlice, slice("s1", "api", "198.18.1.1"));
        assert_eq!(moved, BTreeSet::from([key("api"), key("web")]));
        assert!(addresses(&c, "web").is_empty());
        let gone = c.delete(Kind::Service, &doc(WEB));
        assert_eq!(gone, BTreeSet::from([key("web")]));
        assert!(
            c.service(&key("web"), &mut Notes::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_bad_object_keeps_its_last_good_state_and_is_named() {
        let mut c = Cluster::default();
        c.apply(Kind::Service, doc(WEB));
        c.apply(Kind::EndpointSlice, slice("s1", "web", "198.18.1.1"));
        let bad = c.apply(Kind::EndpointSlice, slice("s1", "web", "198.18.1.999"));
        assert!(bad.is_empty(), "nothing to publish");
        assert_eq!(addresses(&c, "web"), ["198.18.1.1"]);
        let invalid: Vec<&str> = c.invalid().collect();
        assert_eq!(
            invalid,
            [
                "EndpointSlice shop/s1: endpoints[0].addresses[0]: \"198.18.1.999\" is not an IP address"
            ]
        );
        c.apply(Kind::EndpointSlice, slice("s1", "web", "198.18.1.2"));
        assert_eq!(addresses(&c, "web"), ["198.18.1.2"]);
        assert_eq!(c.invalid().count(), 0);
    }

    #[test]
    fn a_relist_forgets_what_it_no_longer_holds() {
        let mut c = Cluster::default();
        c.apply(Kind::Service, doc(WEB));
        c.apply(Kind::EndpointSlice, slice("s1", "web", "198.18.1.1"));
        c.apply(Kind::EndpointSlice, slice("s2", "web", "198.18.1.2"));
        let fqdn = doc("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: f, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: FQDN");
        c.apply(Kind::EndpointSlice, fqdn);
        assert_eq!(c.not_served(), 1);
        c.listing(Kind::EndpointSlice);
        c.apply(Kind::EndpointSlice, slice("s2", "web", "198.18.1.2"));
        assert_eq!(
            addresses(&c, "web"),
            ["198.18.1.1", "198.18.1.2"],
            "not before it ends"
        );
        assert_eq!(c.listed(Kind::EndpointSlice), BTreeSet::from([key("web")]));
        assert_eq!(addresses(&c, "web"), ["198.18.1.2"]);
        assert_eq!(c.not_served(), 0, "the FQDN slice is gone too");
        c.listing(Kind::Service);
        assert_eq!(c.listed(Kind::Service), BTreeSet::from([key("web")]));
        assert!(
            c.service(&key("web"), &mut Notes::default())
                .unwrap()
                .is_none()
        );
    }
}
