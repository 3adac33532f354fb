package svcproxy

// The table schema, shared with the svcproxyd daemon and the C API's JSON functions.

// Batch is a set of changes applied together: removals first, then upserts.
type Batch struct {
	Upsert []Service `json:"upsert,omitempty"`
	Remove []string  `json:"remove,omitempty"`
}

// Table is every service with its endpoints.
type Table struct {
	Services []Service `json:"services"`
}

// Service is a service: where clients connect and how they are balanced. Endpoints, when
// non-nil, replace the service's endpoints; nil keeps them.
type Service struct {
	Name                  string      `json:"name"`
	Addresses             []string    `json:"addresses,omitempty"`
	ExternalAddresses     []string    `json:"external_addresses,omitempty"`
	LoadBalancerAddresses []string    `json:"load_balancer_addresses,omitempty"`
	SourceRanges          []string    `json:"load_balancer_source_ranges,omitempty"` // CIDRs allowed at the load balancer addresses
	HealthCheckNodePort   uint16      `json:"health_check_node_port,omitempty"`
	Ports                 []Port      `json:"ports"`
	Policy                string      `json:"policy,omitempty"` // round_robin, random, weighted_round_robin, least_connections, maglev
	MaglevTableSize       uint32      `json:"maglev_table_size,omitempty"`
	SessionAffinity       string      `json:"session_affinity,omitempty"` // none, client_ip
	AffinityTimeoutSecs   uint64      `json:"affinity_timeout_seconds,omitempty"`
	PublishNotReady       bool        `json:"publish_not_ready,omitempty"`
	InternalTrafficPolicy string      `json:"internal_traffic_policy,omitempty"` // Cluster, Local
	ExternalTrafficPolicy string      `json:"external_traffic_policy,omitempty"`
	MaxConnections        uint32      `json:"max_connections,omitempty"`
	Endpoints             *[]Endpoint `json:"endpoints,omitempty"`
}

// Port is one port of a service. TargetPort is a number, a name, or nil for the endpoint's
// own port.
type Port struct {
	Name       string `json:"name,omitempty"`
	Protocol   string `json:"protocol,omitempty"` // TCP (default) or UDP
	Port       uint16 `json:"port"`
	TargetPort any    `json:"target_port,omitempty"`
	NodePort   uint16 `json:"node_port,omitempty"`
}

// Endpoint is a backend: "ip:port", or "ip" with named ports.
type Endpoint struct {
	Address     string            `json:"address"`
	Ports       map[string]uint16 `json:"ports,omitempty"`
	Ready       *bool             `json:"ready,omitempty"` // default true
	Serving     *bool             `json:"serving,omitempty"`
	Terminating bool              `json:"terminating,omitempty"`
	Weight      uint32            `json:"weight,omitempty"` // default 1
	Node        string            `json:"node,omitempty"`
	Zone        string            `json:"zone,omitempty"`
	ForZones    []string          `json:"for_zones,omitempty"` // topology hints
	ForNodes    []string          `json:"for_nodes,omitempty"`
}

// Endpoints is a helper to set Service.Endpoints.
func Endpoints(eps ...Endpoint) *[]Endpoint { return &eps }

// Counters are the traffic counters of a service port or endpoint.
type Counters struct {
	ConnectionsTotal  uint64 `json:"connections_total"`
	ConnectionsActive uint64 `json:"connections_active"`
	BytesIn           uint64 `json:"bytes_in"`
	BytesOut          uint64 `json:"bytes_out"`
	ConnectErrors     uint64 `json:"connect_errors"`
	Refused           uint64 `json:"refused"` // no eligible endpoint
	Limited           uint64 `json:"limited"` // refused by a limit: the flow table full, or one client over its share
	Evicted           uint64 `json:"evicted"` // closed to make room: TCP connections idle longest, UDP flows never answered
	DatagramsIn       uint64 `json:"datagrams_in"`
	DatagramsOut      uint64 `json:"datagrams_out"`
}

// PortStats are the counters of one service port and its endpoints.
type PortStats struct {
	Service   string   `json:"service"`
	Port      string   `json:"port"`
	Protocol  string   `json:"protocol"`
	Totals    Counters `json:"totals"`
	Endpoints []struct {
		Address  string   `json:"address"`
		Counters Counters `json:"counters"`
	} `json:"endpoints"`
}
