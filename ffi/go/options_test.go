package svcproxy

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// needRoot skips the test when not root, naming what needs it; under CI it must not skip.
func needRoot(t *testing.T, what string) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s needs root, and under CI this test must not skip", what)
		}
		t.Skipf("skipped: %s needs root", what)
	}
}

func TestNodeOptionsReachTheTable(t *testing.T) {
	a, b := backend(t), backend(t)
	o := DefaultOptions()
	o.Workers = 1
	o.NodeZone = "zone-a"
	o.NodeAddresses = []string{"127.0.0.3"}
	o.ClusterCIDRs = []string{"198.18.0.0/15"}
	p, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	port, nodePort := freePort(t), freePort(t)
	_, err = p.Apply(Batch{Upsert: []Service{{
		Name: "go/zoned", Addresses: []string{"127.0.0.1"}, Ports: []Port{{Port: port, NodePort: nodePort}},
		Endpoints: Endpoints(
			Endpoint{Address: a.Addr().String(), Zone: "zone-a", ForZones: []string{"zone-a"}},
			Endpoint{Address: b.Addr().String(), Zone: "zone-b", ForZones: []string{"zone-b"}},
		),
	}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	// The zone hints keep this node's clients on its zone's endpoint.
	for i := 0; i < 4; i++ {
		if got := ask(t, fmt.Sprintf("127.0.0.1:%d", port)); got != a.Addr().String() {
			t.Fatalf("connection %d went to %s, outside zone-a", i, got)
		}
	}
	// The node port is served on the node address given, and only there.
	if got := ask(t, fmt.Sprintf("127.0.0.3:%d", nodePort)); got != a.Addr().String() {
		t.Fatalf("node port: %s", got)
	}
	if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", nodePort), time.Second); err == nil {
		c.Close()
		t.Fatal("the node port is served on an address that is not a node address")
	}
}

func TestSpliceForwardingOnIoUring(t *testing.T) {
	a := backend(t)
	o := DefaultOptions()
	o.Workers = 1
	o.Backend = IoUring
	o.Forwarding = Splice
	p, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	port := freePort(t)
	if _, err := p.Apply(Batch{Upsert: []Service{{Name: "go/spliced", Addresses: []string{"127.0.0.1"},
		Ports: []Port{{Port: port}}, Endpoints: Endpoints(Endpoint{Address: a.Addr().String()})}}}); err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	if p.Backend() != IoUring {
		t.Fatalf("backend %s", p.Backend())
	}
	if got := ask(t, fmt.Sprintf("127.0.0.1:%d", port)); got != a.Addr().String() {
		t.Fatalf("spliced connection went to %s", got)
	}
}

func TestPreserveClientIP(t *testing.T) {
	needRoot(t, "IP_TRANSPARENT")
	a := backend(t)
	for _, preserve := range []bool{false, true} {
		o := DefaultOptions()
		o.Workers = 1
		o.PreserveClientIP = preserve
		p, err := New(o)
		if err != nil {
			t.Fatal(err)
		}
		port := freePort(t)
		if _, err := p.Apply(Batch{Upsert: []Service{{Name: "go/source", Addresses: []string{"127.0.0.1"},
			Ports: []Port{{Port: port}}, Endpoints: Endpoints(Endpoint{Address: a.Addr().String()})}}}); err != nil {
			t.Fatal(err)
		}
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
		// On loopback every 127/8 address is local, so the replies to the client's address
		// come back to this host without the routing a node needs.
		_, seen := askFrom(t, "127.0.0.2", fmt.Sprintf("127.0.0.1:%d", port))
		host, _, _ := net.SplitHostPort(seen)
		if want := map[bool]string{false: "127.0.0.1", true: "127.0.0.2"}[preserve]; host != want {
			t.Fatalf("PreserveClientIP %v: the backend saw %s, want %s", preserve, seen, want)
		}
		p.Close()
	}
}

func TestBadOptionsAreNamed(t *testing.T) {
	var e *Error
	for _, c := range []struct {
		change func(*Options)
		named  string
	}{
		{func(o *Options) { o.Forwarding = 7 }, "options.forwarding"},
		{func(o *Options) { o.NodeAddresses = []string{"127.0.0.1", "node-a"} }, "options.node_addresses[1]"},
		{func(o *Options) { o.ClusterCIDRs = []string{"198.18.0.0/33"} }, "options.cluster_cidrs[0]"},
		{func(o *Options) { o.MaxUDPFlows = 0 }, "max_udp_flows"},
		{func(o *Options) { o.MaxConnectionsPerClient = -1 }, "MaxConnectionsPerClient"},
	} {
		o := DefaultOptions()
		c.change(&o)
		if _, err := New(o); !errors.As(err, &e) || e.Code != CodeInvalid || !strings.Contains(e.Message, c.named) {
			t.Errorf("want an error naming %s, got %v", c.named, err)
		}
	}
}
