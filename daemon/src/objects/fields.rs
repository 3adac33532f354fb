//! The fields of the Kubernetes objects svcproxyd reads, as the API defines them, to warn about
//! any other field (a typo such as `clusterIp` would otherwise be ignored without a word).

use serde_norway::Value;

/// The known keys of a mapping, and what each holds.
pub struct Shape(&'static [(&'static str, Child)]);

/// What a known key holds.
#[derive(Clone, Copy)]
enum Child {
    /// Anything (a scalar, or a structure not checked).
    Any,
    /// A mapping of this shape.
    Map(&'static Shape),
    /// A list of mappings of this shape.
    List(&'static Shape),
}

use Child::{Any, List, Map};

const METADATA: Shape = Shape(&[
    ("annotations", Any),
    ("creationTimestamp", Any),
    ("deletionGracePeriodSeconds", Any),
    ("deletionTimestamp", Any),
    ("finalizers", Any),
    ("generateName", Any),
    ("generation", Any),
    ("labels", Any),
    ("managedFields", Any),
    ("name", Any),
    ("namespace", Any),
    ("ownerReferences", Any),
    ("resourceVersion", Any),
    ("selfLink", Any),
    ("uid", Any),
]);

const SERVICE_PORT: Shape = Shape(&[
    ("appProtocol", Any),
    ("name", Any),
    ("nodePort", Any),
    ("port", Any),
    ("protocol", Any),
    ("targetPort", Any),
]);

const SERVICE_SPEC: Shape = Shape(&[
    ("allocateLoadBalancerNodePorts", Any),
    ("clusterIP", Any),
    ("clusterIPs", Any),
    ("externalIPs", Any),
    ("externalName", Any),
    ("externalTrafficPolicy", Any),
    ("healthCheckNodePort", Any),
    ("internalTrafficPolicy", Any),
    ("ipFamilies", Any),
    ("ipFamilyPolicy", Any),
    ("loadBalancerClass", Any),
    ("loadBalancerIP", Any),
    ("loadBalancerSourceRanges", Any),
    ("ports", List(&SERVICE_PORT)),
    ("publishNotReadyAddresses", Any),
    ("selector", Any),
    ("sessionAffinity", Any),
    ("sessionAffinityConfig", Any),
    ("topologyKeys", Any),
    ("trafficDistribution", Any),
    ("type", Any),
]);

/// A `v1 Service`.
pub const SERVICE: &Shape = &Shape(&[
    ("apiVersion", Any),
    ("kind", Any),
    ("metadata", Map(&METADATA)),
    ("spec", Map(&SERVICE_SPEC)),
    ("status", Any),
]);

const CONDITIONS: Shape = Shape(&[("ready", Any), ("serving", Any), ("terminating", Any)]);

const SLICE_ENDPOINT: Shape = Shape(&[
    ("addresses", Any),
    ("conditions", Map(&CONDITIONS)),
    ("deprecatedTopology", Any),
    ("hints", Any),
    ("hostname", Any),
    ("nodeName", Any),
    ("targetRef", Any),
    ("zone", Any),
]);

const SLICE_PORT: Shape = Shape(&[
    ("appProtocol", Any),
    ("name", Any),
    ("port", Any),
    ("protocol", Any),
]);

/// A `discovery.k8s.io/v1 EndpointSlice`.
pub const SLICE: &Shape = &Shape(&[
    ("addressType", Any),
    ("apiVersion", Any),
    ("endpoints", List(&SLICE_ENDPOINT)),
    ("kind", Any),
    ("metadata", Map(&METADATA)),
    ("ports", List(&SLICE_PORT)),
]);

/// A `v1 Node` (its spec and status are not checked: only its taints are read).
pub const NODE: &Shape = &Shape(&[
    ("apiVersion", Any),
    ("kind", Any),
    ("metadata", Map(&METADATA)),
    ("spec", Any),
    ("status", Any),
]);

/// Adds a warning to `warnings` for each key of `value` (at `path`) that `shape` does not
/// know, with a "did you mean" for a near miss; the caller names the object.
pub fn check(value: &Value, shape: &Shape, path: &str, warnings: &mut Vec<String>) {
    let Value::Mapping(map) = value else { return };
    for (key, child) in map {
        let key = match key {
            Value::String(k) => k.as_str(),
            _ => continue,
        };
        let here = format!("{path}{key}");
        match shape.0.iter().find(|(k, _)| *k == key) {
            None => {
                let hint = super::did_you_mean(key, shape.0.iter().map(|(k, _)| *k));
                warnings.push(format!(
                    "unknown field {}{hint}, ignored",
                    super::clip(&here)
                ));
            }
            Some((_, Any)) => {}
            Some((_, Map(inner))) => check(child, inner, &format!("{here}."), warnings),
            Some((_, List(inner))) => {
                if let Value::Sequence(items) = child {
                    for (i, item) in items.iter().enumerate() {
                        check(item, inner, &format!("{here}[{i}]."), warnings);
                    }
                }
            }
        }
    }
}
