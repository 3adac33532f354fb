// Package svcproxy embeds the svcproxy L4 service proxy (a Kubernetes Service as a library)
// in a Go program, through its C ABI.
//
// Build the static library first, then point cgo at it:
//
//	cargo build --release -p svcproxy-ffi
//	CGO_LDFLAGS="-L$REPO/target/release" go build ./...
//
// A Proxy is safe for concurrent use. Table changes are JSON documents of the same schema as
// the svcproxyd daemon's (see Service, Batch).
package svcproxy

/*
#cgo CFLAGS: -I${SRCDIR}/../include
#cgo LDFLAGS: -l:libsvcproxy_ffi.a -lpthread -ldl -lm
#include <stdlib.h>
#include "svcproxy.h"
*/
import "C"

import (
	"encoding/json"
	"fmt"
	"math"
	"runtime"
	"sync"
	"time"
	"unsafe"
)

// Backend selects the data plane.
type Backend uint32

const (
	// Auto: io_uring where available, else epoll.
	Auto Backend = C.SVCPROXY_BACKEND_AUTO
	// Epoll: edge-triggered epoll with splice.
	Epoll Backend = C.SVCPROXY_BACKEND_EPOLL
	// IoUring: io_uring.
	IoUring Backend = C.SVCPROXY_BACKEND_IO_URING
)

func (b Backend) String() string {
	switch b {
	case Epoll:
		return "epoll"
	case IoUring:
		return "io_uring"
	default:
		return "auto"
	}
}

// Code is a result code of the C API.
type Code int

// Result codes (stable numbers).
const (
	CodeNull           Code = C.SVCPROXY_RESULT_NULL
	CodeInvalid        Code = C.SVCPROXY_RESULT_INVALID
	CodeUnknownService Code = C.SVCPROXY_RESULT_UNKNOWN_SERVICE
	CodeConflict       Code = C.SVCPROXY_RESULT_CONFLICT
	CodeJSON           Code = C.SVCPROXY_RESULT_JSON
	CodeStart          Code = C.SVCPROXY_RESULT_START
	CodeState          Code = C.SVCPROXY_RESULT_STATE
	CodeBuffer         Code = C.SVCPROXY_RESULT_BUFFER
	CodePanic          Code = C.SVCPROXY_RESULT_PANIC
	CodeTimeout        Code = C.SVCPROXY_RESULT_TIMEOUT
)

// Error is an error reported by svcproxy: its code and text.
type Error struct {
	Code    Code
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("svcproxy: %s (code %d)", e.Message, e.Code) }

const errLen = 512

// call runs f with an error buffer and turns its result into an error.
func call(f func(err *C.char, errLen C.size_t) C.svcproxy_result) error {
	buf := make([]byte, errLen)
	r := f((*C.char)(unsafe.Pointer(&buf[0])), errLen)
	if r == C.SVCPROXY_RESULT_OK {
		return nil
	}
	return &Error{Code: Code(r), Message: C.GoString((*C.char)(unsafe.Pointer(&buf[0])))}
}

// Forwarding is how the io_uring backend moves TCP bytes (the epoll backend always splices).
type Forwarding uint32

const (
	Buffers Forwarding = C.SVCPROXY_FORWARDING_BUFFERS // receive into kernel-chosen buffers, send from them; splice streams
	Splice  Forwarding = C.SVCPROXY_FORWARDING_SPLICE  // splice through a pipe per direction, as epoll does
)

// Options configure a Proxy. Start from DefaultOptions. They are those of the svcproxyd
// daemon's [proxy] and [node] sections (and its capture's preserve_client_ip).
type Options struct {
	Backend                 Backend
	Workers                 int           // 0: one per CPU
	ConnectTimeout          time.Duration // first attempt; doubled per further attempt
	ConnectAttempts         int
	IdleTimeout             time.Duration // 0: none
	UDPIdleTimeout          time.Duration
	MaxConnections          int
	MaxConnectionsPerClient int           // per client IP; 0: a quarter of MaxConnections
	MaxUDPFlows             int           // per worker
	MaxUDPFlowsPerClient    int           // per worker and client IP; 0: a quarter of MaxUDPFlows
	DrainCloseAfter         time.Duration // 0: keep connections to removed endpoints
	Forwarding              Forwarding
	// PreserveClientIP connects to endpoints from the client's address (IP_TRANSPARENT: needs
	// CAP_NET_ADMIN, and routing that brings the replies back to this host).
	PreserveClientIP bool
	NodeName         string   // for traffic policy Local
	NodeZone         string   // for endpoints' zone hints
	NodeAddresses    []string // where node ports are served; none: every IPv4 address
	ClusterCIDRs     []string // pod and node networks: their clients are inside the cluster
}

// DefaultOptions returns svcproxy's defaults.
func DefaultOptions() Options {
	var o C.svcproxy_options
	C.svcproxy_options_default(&o)
	return Options{
		Backend:                 Backend(o.backend),
		Workers:                 int(o.workers),
		ConnectTimeout:          time.Duration(o.connect_timeout_ms) * time.Millisecond,
		ConnectAttempts:         int(o.connect_attempts),
		IdleTimeout:             time.Duration(o.idle_timeout_ms) * time.Millisecond,
		UDPIdleTimeout:          time.Duration(o.udp_idle_timeout_ms) * time.Millisecond,
		MaxConnections:          int(o.max_connections),
		MaxConnectionsPerClient: int(o.max_connections_per_client),
		MaxUDPFlows:             int(o.max_udp_flows),
		MaxUDPFlowsPerClient:    int(o.max_udp_flows_per_client),
		Forwarding:              Forwarding(o.forwarding),
		PreserveClientIP:        bool(o.preserve_client_ip),
	}
}

// cStrings is ss as a C array of C strings, and the function that frees it.
func cStrings(ss []string) (**C.char, C.size_t, func()) {
	if len(ss) == 0 {
		return nil, 0, func() {}
	}
	array := unsafe.Slice((**C.char)(C.malloc(C.size_t(len(ss))*C.size_t(unsafe.Sizeof((*C.char)(nil))))), len(ss))
	for i, s := range ss {
		array[i] = C.CString(s)
	}
	return &array[0], C.size_t(len(ss)), func() {
		for _, p := range array {
			C.free(unsafe.Pointer(p))
		}
		C.free(unsafe.Pointer(&array[0]))
	}
}

// cString is s as a C string (nil when empty), and the function that frees it.
func cString(s string) (*C.char, func()) {
	if s == "" {
		return nil, func() {}
	}
	p := C.CString(s)
	return p, func() { C.free(unsafe.Pointer(p)) }
}

// Proxy is a running (or startable) svcproxy with its service table.
type Proxy struct {
	mu sync.RWMutex // read: a call on the handle (the C ABI lets them run at once); write: Close
	h  *C.svcproxy_proxy
}

// ceilMillis is d in whole milliseconds, rounded up: the C API counts milliseconds, and a
// positive duration must not become 0 (which means "none" or "at once").
func ceilMillis(d time.Duration) int64 {
	ms := int64(d / time.Millisecond)
	if d%time.Millisecond > 0 {
		ms++
	}
	return ms
}

// waitMillis is d for a C wait argument: rounded up to whole milliseconds, at most
// math.MaxUint32 (49.7 days, longer waits are that long), negative as 0.
func waitMillis(d time.Duration) C.uint32_t {
	ms := ceilMillis(d)
	if ms < 0 {
		return 0
	}
	if ms > math.MaxUint32 {
		return C.uint32_t(math.MaxUint32)
	}
	return C.uint32_t(ms)
}

// New creates a proxy with an empty table. Close it when done (a finalizer closes a
// forgotten one). Durations are rounded up to whole milliseconds; one over 49.7 days is an
// error.
func New(o Options) (*Proxy, error) {
	var c C.svcproxy_options
	C.svcproxy_options_default(&c)
	fields := []struct {
		name  string
		value int64
		to    *C.uint32_t
	}{
		{"Backend", int64(o.Backend), &c.backend},
		{"Workers", int64(o.Workers), &c.workers},
		{"ConnectTimeout (ms)", ceilMillis(o.ConnectTimeout), &c.connect_timeout_ms},
		{"ConnectAttempts", int64(o.ConnectAttempts), &c.connect_attempts},
		{"IdleTimeout (ms)", ceilMillis(o.IdleTimeout), &c.idle_timeout_ms},
		{"UDPIdleTimeout (ms)", ceilMillis(o.UDPIdleTimeout), &c.udp_idle_timeout_ms},
		{"MaxConnections", int64(o.MaxConnections), &c.max_connections},
		{"MaxConnectionsPerClient", int64(o.MaxConnectionsPerClient), &c.max_connections_per_client},
		{"MaxUDPFlows", int64(o.MaxUDPFlows), &c.max_udp_flows},
		{"MaxUDPFlowsPerClient", int64(o.MaxUDPFlowsPerClient), &c.max_udp_flows_per_client},
		{"DrainCloseAfter (ms)", ceilMillis(o.DrainCloseAfter), &c.drain_close_after_ms},
		{"Forwarding", int64(o.Forwarding), &c.forwarding},
	}
	for _, f := range fields {
		// A value the C options cannot hold must not wrap into another one.
		if f.value < 0 || f.value > math.MaxUint32 {
			return nil, &Error{Code: CodeInvalid, Message: fmt.Sprintf("option %s is %d, must be between 0 and %d", f.name, f.value, uint32(math.MaxUint32))}
		}
		*f.to = C.uint32_t(f.value)
	}
	c.preserve_client_ip = C.bool(o.PreserveClientIP)
	var free func()
	c.node_name, free = cString(o.NodeName)
	defer free()
	c.node_zone, free = cString(o.NodeZone)
	defer free()
	c.node_addresses, c.node_addresses_len, free = cStrings(o.NodeAddresses)
	defer free()
	c.cluster_cidrs, c.cluster_cidrs_len, free = cStrings(o.ClusterCIDRs)
	defer free()
	p := &Proxy{}
	err := call(func(e *C.char, n C.size_t) C.svcproxy_result { return C.svcproxy_proxy_new(&c, &p.h, e, n) })
	if err != nil {
		return nil, err
	}
	runtime.SetFinalizer(p, func(p *Proxy) { _ = p.Close() })
	return p, nil
}

// handle returns the C handle, or an error once the proxy is closed.
func (p *Proxy) handle() (*C.svcproxy_proxy, error) {
	if p.h == nil {
		return nil, &Error{Code: CodeState, Message: "the proxy is closed"}
	}
	return p.h, nil
}

func (p *Proxy) with(f func(h *C.svcproxy_proxy) error) error {
	p.mu.RLock()
	defer p.mu.RUnlock()
	h, err := p.handle()
	if err != nil {
		return err
	}
	return f(h)
}

// Start starts the workers; it returns once they serve the table's frontends.
func (p *Proxy) Start() error {
	return p.with(func(h *C.svcproxy_proxy) error {
		return call(func(e *C.char, n C.size_t) C.svcproxy_result { return C.svcproxy_proxy_start(h, e, n) })
	})
}

// Backend reports the backend running (Auto when not running).
func (p *Proxy) Backend() Backend {
	var b Backend
	_ = p.with(func(h *C.svcproxy_proxy) error {
		b = Backend(C.svcproxy_proxy_backend(h))
		return nil
	})
	return b
}

// Apply applies a batch of changes as one table generation, or nothing of it, and returns
// the new generation.
func (p *Proxy) Apply(b Batch) (uint64, error) {
	doc, err := json.Marshal(b)
	if err != nil {
		return 0, err
	}
	return p.ApplyJSON(string(doc))
}

// ApplyJSON applies a JSON batch document ({"upsert": [...], "remove": [...]}).
func (p *Proxy) ApplyJSON(doc string) (uint64, error) {
	var gen C.uint64_t
	err := p.with(func(h *C.svcproxy_proxy) error {
		s := C.CString(doc)
		defer C.free(unsafe.Pointer(s))
		return call(func(e *C.char, n C.size_t) C.svcproxy_result {
			return C.svcproxy_proxy_apply_json(h, s, &gen, e, n)
		})
	})
	return uint64(gen), err
}

// Sync waits until every worker has applied the current table generation, for up to timeout
// (rounded up to whole milliseconds; at most 49.7 days).
func (p *Proxy) Sync(timeout time.Duration) (uint64, error) {
	var gen C.uint64_t
	err := p.with(func(h *C.svcproxy_proxy) error {
		return call(func(e *C.char, n C.size_t) C.svcproxy_result {
			return C.svcproxy_proxy_sync(h, waitMillis(timeout), &gen, e, n)
		})
	})
	return uint64(gen), err
}

// readJSON calls a C function that fills a caller buffer with JSON, growing the buffer.
func readJSON(f func(buf *C.char, capacity C.size_t, needed *C.size_t, e *C.char, n C.size_t) C.svcproxy_result, out any) error {
	size := C.size_t(4096)
	for {
		buf := make([]byte, size)
		var needed C.size_t
		err := call(func(e *C.char, n C.size_t) C.svcproxy_result {
			return f((*C.char)(unsafe.Pointer(&buf[0])), size, &needed, e, n)
		})
		if e, ok := err.(*Error); ok && e.Code == CodeBuffer {
			size = needed
			continue
		}
		if err != nil {
			return err
		}
		return json.Unmarshal(buf[:needed-1], out)
	}
}

// Table returns every service with its endpoints.
func (p *Proxy) Table() (Table, error) {
	var t Table
	err := p.with(func(h *C.svcproxy_proxy) error {
		return readJSON(func(b *C.char, c C.size_t, nd *C.size_t, e *C.char, n C.size_t) C.svcproxy_result {
			return C.svcproxy_proxy_table_json(h, b, c, nd, e, n)
		}, &t)
	})
	return t, err
}

// Stats returns the counters of every service port and endpoint.
func (p *Proxy) Stats() ([]PortStats, error) {
	var s struct {
		Ports []PortStats `json:"ports"`
	}
	err := p.with(func(h *C.svcproxy_proxy) error {
		return readJSON(func(b *C.char, c C.size_t, nd *C.size_t, e *C.char, n C.size_t) C.svcproxy_result {
			return C.svcproxy_proxy_stats_json(h, b, c, nd, e, n)
		}, &s)
	})
	return s.Ports, err
}

// AttachSocketLB balances the clients in a cgroup v2 directory ("" for the cgroup v2 root:
// every process) at the socket: cgroup BPF programs connect them straight to an endpoint,
// following the proxy's table, until DetachSocketLB or Shutdown. The proxy must be running.
// It needs root; on error the proxy serves every client as before.
func (p *Proxy) AttachSocketLB(cgroup string) error {
	return p.with(func(h *C.svcproxy_proxy) error {
		var c *C.char
		if cgroup != "" {
			c = C.CString(cgroup)
			defer C.free(unsafe.Pointer(c))
		}
		return call(func(e *C.char, n C.size_t) C.svcproxy_result {
			return C.svcproxy_proxy_attach_socket_lb(h, c, e, n)
		})
	})
}

// DetachSocketLB detaches socket-level load balancing: every client goes through the proxy.
func (p *Proxy) DetachSocketLB() error {
	return p.with(func(h *C.svcproxy_proxy) error {
		return call(func(e *C.char, n C.size_t) C.svcproxy_result {
			return C.svcproxy_proxy_detach_socket_lb(h, e, n)
		})
	})
}

// Shutdown stops accepting, lets connections finish for up to grace (rounded up to whole
// milliseconds; at most 49.7 days), then stops the workers.
func (p *Proxy) Shutdown(grace time.Duration) error {
	return p.with(func(h *C.svcproxy_proxy) error {
		return call(func(e *C.char, n C.size_t) C.svcproxy_result {
			return C.svcproxy_proxy_shutdown(h, waitMillis(grace), e, n)
		})
	})
}

// Close stops the proxy at once (if running) and frees it. Closing twice is harmless.
func (p *Proxy) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.h != nil {
		C.svcproxy_proxy_free(p.h)
		p.h = nil
		runtime.SetFinalizer(p, nil)
	}
	return nil
}

// Version is the library version.
func Version() string { return C.GoString(C.svcproxy_version()) }
