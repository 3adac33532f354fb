//! What the sources (the config files, the Kubernetes API) want served, published as the
//! smallest batch against the table: a service equal to the published one changes nothing, and
//! a change of endpoints replaces that service's endpoints only, so the workers reconcile only
//! the frontends that changed.
//!
//! When two services claim one frontend (an external or load-balancer address and port, say)
//! and conflicts are settled (`settle`, for Kubernetes objects), the one whose name sorts first keeps it
//! whatever the order of the changes, and the other is published without that address (or node
//! port), reported in [`Publisher::contested`], and given it back once it is free. Otherwise a
//! conflict fails the whole publish, as the table does.

use std::collections::BTreeMap;

use svcproxy::core::{Batch, Change};
use svcproxy::{Endpoint, Service, ServicePortKey, Table, TableError};
use svcproxy_core::error::ValidationError;
use svcproxy_core::schema::ServiceDoc;

/// A service as a source wants it, with its endpoints.
pub type Wanted = (Service, Vec<Endpoint>);

/// The service and endpoints `doc` describes, checked as the table checks them.
pub fn wanted(doc: &ServiceDoc) -> Result<Wanted, ValidationError> {
    let (service, endpoints) = doc.to_model()?;
    let endpoints = endpoints.unwrap_or_default();
    service.validate()?;
    svcproxy::core::model::validate_endpoints(&endpoints, &service.ports)?;
    Ok((service, endpoints))
}

/// The most attempts at one publish (each settles a conflict or leaves a service out).
const MAX_ATTEMPTS: usize = 256;

/// Settles and remembers conflicts across publishes.
#[derive(Debug, Default)]
pub struct Publisher {
    /// Services published without what another holds: what they want, and each frontend
    /// they lost with the service that holds it.
    contested: BTreeMap<String, (Wanted, Vec<(ServicePortKey, String)>)>,
}

/// What a publish did.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// The generation published (the current one when nothing changed).
    pub generation: u64,
    /// The services whose endpoints changed.
    pub endpoints_changed: Vec<String>,
    /// The services left as they were, each with why.
    pub refused: Vec<String>,
}

impl Publisher {
    /// Makes the table hold what `wanted` says of each service it names (`None`: not at all),
    /// publishing with `apply`; services it does not name stay as they are. When a change is
    /// refused the others are published all the same and the refusal is reported, but for a
    /// conflict that is not settled (`settle` false), which fails it all.
    pub fn publish(
        &mut self,
        table: &Table,
        mut wanted: BTreeMap<String, Option<Wanted>>,
        settle: bool,
        mut apply: impl FnMut(Batch) -> Result<u64, TableError>,
    ) -> Result<Outcome, TableError> {
        // A service published without a frontend may have it back now.
        for (name, (full, _)) in &self.contested {
            wanted
                .entry(name.clone())
                .or_insert_with(|| Some(full.clone()));
        }
        let mut lost: BTreeMap<String, Vec<(ServicePortKey, String)>> = BTreeMap::new();
        let mut refused = Vec::new();
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            let snapshot = table.load_full();
            let mut batch = Batch::new();
            let mut endpoints_changed = Vec::new();
            // The changes that give frontends up go first: the table applies them in order.
            let (giving, keeping): (Vec<_>, Vec<_>) = wanted
                .iter()
                .partition(|(name, _)| lost.contains_key(*name));
            for (name, want) in giving.into_iter().chain(keeping) {
                let published = snapshot.service(name);
                let Some((service, endpoints)) = want else {
                    if published.is_some() {
                        batch.push(Change::Remove(name.clone()));
                    }
                    continue;
                };
                let service = without(service, lost.get(name).map_or(&[], Vec::as_slice));
                if published.is_none_or(|p| *p.spec() != service) {
                    batch.push(Change::Upsert(service));
                }
                if published.is_none_or(|p| p.endpoints() != &endpoints[..]) {
                    batch.push(Change::ReplaceEndpoints {
                        service: name.clone(),
                        endpoints: endpoints.clone(),
                    });
                    endpoints_changed.push(name.clone());
                }
            }
            match apply(batch) {
                Ok(generation) => {
                    for name in wanted.keys() {
                        self.contested.remove(name);
                    }
                    for (name, losses) in lost {
                        if let Some(Some(full)) = wanted.remove(&name) {
                            self.contested.insert(name, (full, losses));
                        }
                    }
                    return Ok(Outcome {
                        generation,
                        endpoints_changed,
                        refused,
                    });
                }
                Err(TableError::Conflict {
                    service,
                    key,
                    other,
                }) if settle => {
                    let (winner, loser) = if service < other {
                        (service, other)
                    } else {
                        (other, service)
                    };
                    if !wanted.contains_key(&loser) {
                        // The holder gives the frontend up: what it wants stays the same.
                        let held = self.contested.get(&loser).map(|(full, _)| full.clone());
                        let published = snapshot
                            .service(&loser)
                            .map(|s| (s.spec().clone(), s.endpoints().to_vec()));
                        wanted.insert(loser.clone(), held.or(published));
                    }
                    let losses = lost.entry(loser.clone()).or_default();
                    if losses.iter().any(|(k, _)| *k == key) {
                        // Given up already, yet still held: the table disagrees; stop here.
                        return Err(TableError::Conflict {
                            service: loser,
                            key,
                            other: winner,
                        });
                    }
                    losses.push((key, winner.clone()));
                    last = Some(TableError::Conflict {
                        service: loser,
                        key,
                        other: winner,
                    });
                }
                Err(TableError::Invalid { service, error }) if wanted.contains_key(&service) => {
                    refused.push(format!("service {service:?}: {error}"));
                    wanted.remove(&service);
                    last = Some(TableError::Invalid { service, error });
                }
                Err(e) => return Err(e),
            }
        }
        // More conflicts at once than are settled: the last one stands for them.
        Err(last.expect("an attempt failed"))
    }

    /// Services published without a frontend another service holds: for each, the frontends
    /// it lost and who holds them.
    pub fn contested(&self) -> impl Iterator<Item = (&str, &[(ServicePortKey, String)])> {
        self.contested
            .iter()
            .map(|(name, (_, losses))| (name.as_str(), losses.as_slice()))
    }
}

/// `service` without the frontends it `lost`: the address of each, or, for a node port (at an
/// address that is not the service's), that port's node port.
fn without(service: &Service, lost: &[(ServicePortKey, String)]) -> Service {
    let mut s = service.clone();
    for (key, _) in lost {
        let ip = key.addr.ip();
        let mut found = false;
        for list in [
            &mut s.addresses,
            &mut s.external_addresses,
            &mut s.load_balancer_addresses,
        ] {
            found |= list.contains(&ip);
            list.retain(|a| *a != ip);
        }
        if !found {
            for p in &mut s.ports {
                if p.node_port == Some(key.addr.port()) && p.protocol == key.protocol {
                    p.node_port = None;
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use svcproxy::ServicePort;

    fn service(name: &str, cluster: &str, external: &str) -> Wanted {
        let mut s = Service::new(name).address(cluster.parse().unwrap());
        s.external_addresses.push(external.parse().unwrap());
        s.ports.push(ServicePort::tcp(80));
        let endpoint = Endpoint::new("127.0.0.1:8080".parse().unwrap());
        (s, vec![endpoint])
    }

    fn external(table: &Table, name: &str) -> Vec<IpAddr> {
        table
            .load()
            .service(name)
            .unwrap()
            .spec()
            .external_addresses
            .clone()
    }

    fn publish(p: &mut Publisher, table: &Table, wanted: &[(&str, Option<Wanted>)]) -> Outcome {
        let wanted = wanted
            .iter()
            .map(|(n, w)| (n.to_string(), w.clone()))
            .collect();
        let apply = |batch: Batch| table.apply(batch).map(|p| p.generation);
        p.publish(table, wanted, true, apply).unwrap()
    }

    #[test]
    fn only_what_changed_is_published() {
        let table = Table::default();
        let mut p = Publisher::default();
        let a = service("a", "127.0.0.10", "127.0.1.1");
        let b = service("b", "127.0.0.11", "127.0.1.2");
        let first = publish(&mut p, &table, &[("a", Some(a.clone())), ("b", Some(b))]);
        assert_eq!(first.generation, 1);
        assert_eq!(first.endpoints_changed, ["a", "b"]);
        let again = publish(&mut p, &table, &[("a", Some(a.clone()))]);
        assert_eq!(
            again.generation, 1,
            "the same service again changes nothing"
        );
        assert!(again.endpoints_changed.is_empty());
        let mut moved = a.clone();
        moved.1[0].address = "127.0.0.1:8081".parse().unwrap();
        let before = table.load_full();
        let changed = publish(&mut p, &table, &[("a", Some(moved))]);
        assert_eq!(changed.generation, 2);
        assert_eq!(changed.endpoints_changed, ["a"]);
        let frontends = table.load().frontend_changes(&before);
        let key = |a: &str| ServicePortKey::new(a.parse().unwrap(), svcproxy::Protocol::Tcp);
        assert_eq!(
            frontends.changed,
            [key("127.0.0.10:80"), key("127.0.1.1:80")],
            "the workers look at a's frontends only"
        );
        assert!(frontends.added.is_empty() && frontends.removed.is_empty());
        let gone = publish(&mut p, &table, &[("a", None)]);
        assert_eq!(gone.generation, 3);
        assert!(table.load().service("a").is_none());
    }

    #[test]
    fn a_contested_frontend_goes_to_the_first_name_whatever_the_order_and_comes_back() {
        for order in [["a", "b"], ["b", "a"]] {
            let table = Table::default();
            let mut p = Publisher::default();
            let want = |n: &str| {
                let cluster = if n == "a" { "127.0.0.10" } else { "127.0.0.11" };
                Some(service(n, cluster, "127.0.1.1"))
            };
            publish(&mut p, &table, &[(order[0], want(order[0]))]);
            publish(&mut p, &table, &[(order[1], want(order[1]))]);
            assert_eq!(
                external(&table, "a"),
                ["127.0.1.1".parse::<IpAddr>().unwrap()]
            );
            assert!(external(&table, "b").is_empty(), "b is served without it");
            let contested: Vec<_> = p
                .contested()
                .map(|(n, l)| (n.to_string(), l[0].1.clone()))
                .collect();
            assert_eq!(contested, [("b".to_string(), "a".to_string())]);
            // Once a lets it go, b has it.
            publish(&mut p, &table, &[("a", None)]);
            assert_eq!(
                external(&table, "b"),
                ["127.0.1.1".parse::<IpAddr>().unwrap()]
            );
            assert_eq!(p.contested().count(), 0);
        }
    }

    #[test]
    fn unsettled_conflicts_fail_the_publish_and_change_nothing() {
        let table = Table::default();
        let mut p = Publisher::default();
        publish(
            &mut p,
            &table,
            &[("a", Some(service("a", "127.0.0.10", "127.0.1.1")))],
        );
        let wanted = [(
            "b".to_string(),
            Some(service("b", "127.0.0.11", "127.0.1.1")),
        )];
        let apply = |batch: Batch| table.apply(batch).map(|p| p.generation);
        let err = p
            .publish(&table, wanted.into_iter().collect(), false, apply)
            .unwrap_err();
        assert!(matches!(err, TableError::Conflict { .. }), "{err}");
        assert_eq!(table.load().generation(), 1);
    }
}
