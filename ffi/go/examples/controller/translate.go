package main

import (
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	svcproxy "github.com/svcproxy/svcproxy/ffi/go"
)

// unnamed is the port name that stands for a service's single unnamed port, in the service
// port's target and in the endpoints' named ports alike.
const unnamed = "_"

// translate is the service svcproxy serves for a Kubernetes Service and its EndpointSlices,
// as kube-proxy reads them; false when it is not proxied (headless, or no TCP or UDP port).
func translate(s *corev1.Service, slices []*discoveryv1.EndpointSlice) (svcproxy.Service, bool) {
	if s.Spec.ClusterIP == "" || s.Spec.ClusterIP == corev1.ClusterIPNone {
		return svcproxy.Service{}, false
	}
	out := svcproxy.Service{
		Name:                  s.Namespace + "/" + s.Name,
		Addresses:             s.Spec.ClusterIPs,
		ExternalAddresses:     s.Spec.ExternalIPs,
		SourceRanges:          s.Spec.LoadBalancerSourceRanges,
		InternalTrafficPolicy: "Cluster",
		ExternalTrafficPolicy: "Cluster",
	}
	for _, ingress := range s.Status.LoadBalancer.Ingress {
		if ingress.IP != "" {
			out.LoadBalancerAddresses = append(out.LoadBalancerAddresses, ingress.IP)
		}
	}
	if p := s.Spec.InternalTrafficPolicy; p != nil && *p == corev1.ServiceInternalTrafficPolicyLocal {
		out.InternalTrafficPolicy = "Local"
	}
	if s.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal {
		out.ExternalTrafficPolicy = "Local"
		out.HealthCheckNodePort = uint16(s.Spec.HealthCheckNodePort)
	}
	if s.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		out.SessionAffinity = "client_ip"
		out.AffinityTimeoutSecs = 10800
		if c := s.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			out.AffinityTimeoutSecs = uint64(*c.ClientIP.TimeoutSeconds)
		}
	}
	for _, p := range s.Spec.Ports {
		if p.Protocol != corev1.ProtocolTCP && p.Protocol != corev1.ProtocolUDP && p.Protocol != "" {
			continue
		}
		target := p.Name
		if target == "" {
			target = unnamed
		}
		out.Ports = append(out.Ports, svcproxy.Port{
			Name: p.Name, Protocol: string(p.Protocol), Port: uint16(p.Port),
			TargetPort: target, NodePort: uint16(p.NodePort),
		})
	}
	if len(out.Ports) == 0 {
		return svcproxy.Service{}, false
	}
	endpoints := []svcproxy.Endpoint{}
	seen := map[string]bool{}
	for _, slice := range slices {
		ports := map[string]uint16{}
		for _, p := range slice.Ports {
			if p.Port == nil {
				continue
			}
			name := unnamed
			if p.Name != nil && *p.Name != "" {
				name = *p.Name
			}
			ports[name] = uint16(*p.Port)
		}
		for _, e := range slice.Endpoints {
			ready := e.Conditions.Ready == nil || *e.Conditions.Ready
			serving := ready
			if e.Conditions.Serving != nil {
				serving = *e.Conditions.Serving
			}
			endpoint := svcproxy.Endpoint{
				Ports: ports, Ready: &ready, Serving: &serving,
				Terminating: e.Conditions.Terminating != nil && *e.Conditions.Terminating,
			}
			if e.NodeName != nil {
				endpoint.Node = *e.NodeName
			}
			if e.Zone != nil {
				endpoint.Zone = *e.Zone
			}
			if e.Hints != nil {
				for _, z := range e.Hints.ForZones {
					endpoint.ForZones = append(endpoint.ForZones, z.Name)
				}
				for _, n := range e.Hints.ForNodes {
					endpoint.ForNodes = append(endpoint.ForNodes, n.Name)
				}
			}
			for _, address := range e.Addresses {
				if !seen[address] {
					seen[address] = true
					endpoint.Address = address
					endpoints = append(endpoints, endpoint)
				}
			}
		}
	}
	out.Endpoints = &endpoints
	return out, true
}
