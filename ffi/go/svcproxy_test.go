package svcproxy

import (
	"bufio"
	"errors"
	"fmt"
	"math"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

// backend answers each connection with its own address and the client address it sees, then
// closes it.
func backend(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s %s\n", l.Addr(), c.RemoteAddr())
			c.Close()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return l
}

func freePort(t *testing.T) uint16 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return uint16(l.Addr().(*net.TCPAddr).Port)
}

// ask connects to addr and returns the address of the backend that answered.
func ask(t *testing.T, addr string) string {
	t.Helper()
	backend, _ := askFrom(t, "", addr)
	return backend
}

// askFrom connects from source address from (empty: any) to addr and returns the backend's
// line: its address and the client address it saw.
func askFrom(t *testing.T, from, addr string) (string, string) {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(line)
	return f[0], f[1]
}

func newProxy(t *testing.T) *Proxy {
	t.Helper()
	o := DefaultOptions()
	o.Workers = 2
	p, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestStartTrafficStatsAndShutdown(t *testing.T) {
	a, b := backend(t), backend(t)
	p := newProxy(t)
	port := freePort(t)
	gen, err := p.Apply(Batch{Upsert: []Service{{
		Name:      "go/web",
		Addresses: []string{"127.0.0.1"},
		Ports:     []Port{{Port: port}},
		Endpoints: Endpoints(Endpoint{Address: a.Addr().String()}, Endpoint{Address: b.Addr().String()}),
	}}})
	if err != nil || gen != 1 {
		t.Fatalf("apply: %v (generation %d)", err, gen)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	if p.Backend() == Auto {
		t.Fatal("a started proxy reports its backend")
	}
	vip := fmt.Sprintf("127.0.0.1:%d", port)
	seen := map[string]int{}
	for i := 0; i < 6; i++ {
		seen[ask(t, vip)]++
	}
	if seen[a.Addr().String()] != 3 || seen[b.Addr().String()] != 3 {
		t.Fatalf("round robin: %v", seen)
	}
	stats, err := p.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if len(stats) != 1 || stats[0].Service != "go/web" || stats[0].Totals.ConnectionsTotal != 6 || len(stats[0].Endpoints) != 2 {
		t.Fatalf("stats: %+v", stats)
	}
	table, err := p.Table()
	if err != nil || len(table.Services) != 1 || len(*table.Services[0].Endpoints) != 2 {
		t.Fatalf("table: %+v %v", table, err)
	}
	if err := p.Shutdown(time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := net.DialTimeout("tcp", vip, time.Second); err == nil {
		t.Fatal("nothing listens after shutdown")
	}
}

func TestTableChangesWhileRunning(t *testing.T) {
	a, b := backend(t), backend(t)
	p := newProxy(t)
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	svc := Service{Name: "go/live", Addresses: []string{"127.0.0.1"}, Ports: []Port{{Port: port}},
		Endpoints: Endpoints(Endpoint{Address: a.Addr().String()})}
	if _, err := p.Apply(Batch{Upsert: []Service{svc}}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Sync(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	vip := fmt.Sprintf("127.0.0.1:%d", port)
	if got := ask(t, vip); got != a.Addr().String() {
		t.Fatalf("before: %s", got)
	}
	svc.Endpoints = Endpoints(Endpoint{Address: b.Addr().String()})
	if _, err := p.Apply(Batch{Upsert: []Service{svc}}); err != nil {
		t.Fatal(err)
	}
	p.Sync(5 * time.Second)
	if got := ask(t, vip); got != b.Addr().String() {
		t.Fatalf("after: %s", got)
	}
	if _, err := p.Apply(Batch{Remove: []string{"go/live"}}); err != nil {
		t.Fatal(err)
	}
	p.Sync(5 * time.Second)
	if _, err := net.DialTimeout("tcp", vip, time.Second); err == nil {
		t.Fatal("a removed service refuses")
	}
}

func TestErrors(t *testing.T) {
	p := newProxy(t)
	var e *Error
	_, err := p.ApplyJSON("{not json")
	if !errors.As(err, &e) || e.Code != CodeJSON {
		t.Fatalf("malformed JSON: %v", err)
	}
	_, err = p.Apply(Batch{Remove: []string{"go/ghost"}})
	if !errors.As(err, &e) || e.Code != CodeUnknownService || !strings.Contains(e.Message, "go/ghost") {
		t.Fatalf("unknown service: %v", err)
	}
	_, err = p.Apply(Batch{Upsert: []Service{{Name: "go/bad", Addresses: []string{"127.0.0.1"}, Ports: []Port{{Port: 0}}}}})
	if !errors.As(err, &e) || e.Code != CodeInvalid || !strings.Contains(e.Message, "ports[0].port") {
		t.Fatalf("invalid port: %v", err)
	}
	if err := p.Shutdown(0); !errors.As(err, &e) || e.Code != CodeState {
		t.Fatalf("shutdown before start: %v", err)
	}
	o := DefaultOptions()
	o.ConnectAttempts = 0
	if _, err := New(o); !errors.As(err, &e) || e.Code != CodeInvalid {
		t.Fatalf("bad options: %v", err)
	}
	o = DefaultOptions()
	o.IdleTimeout = 100 * 24 * time.Hour // more milliseconds than the C options hold
	if _, err := New(o); !errors.As(err, &e) || e.Code != CodeInvalid || !strings.Contains(e.Message, "IdleTimeout") {
		t.Fatalf("an option too large must not wrap: %v", err)
	}
	o = DefaultOptions()
	o.UDPIdleTimeout = 2 * 24 * time.Hour
	if _, err := New(o); !errors.As(err, &e) || e.Code != CodeInvalid || !strings.Contains(e.Message, "udp_idle_timeout") {
		t.Fatalf("a duration out of its range: %v", err)
	}
	p.Close()
	if err := p.Start(); !errors.As(err, &e) || e.Code != CodeState {
		t.Fatalf("use after close: %v", err)
	}
	if Version() == "" {
		t.Fatal("version")
	}
}

func TestAClientOverItsShareIsCountedLimited(t *testing.T) {
	// A backend that holds every connection open.
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { held.Close() })
	go func() {
		for {
			c, err := held.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	o := DefaultOptions()
	o.Workers = 1
	o.MaxConnections = 4 // one client address may hold a quarter: one
	p, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	port := freePort(t)
	if _, err := p.Apply(Batch{Upsert: []Service{{Name: "go/held", Addresses: []string{"127.0.0.1"},
		Ports: []Port{{Port: port}}, Endpoints: Endpoints(Endpoint{Address: held.Addr().String()})}}}); err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	totals := func() Counters {
		stats, err := p.Stats()
		if err != nil || len(stats) != 1 {
			t.Fatalf("stats: %+v %v", stats, err)
		}
		return stats[0].Totals
	}
	eventually := func(what string, cond func(Counters) bool) {
		deadline := time.Now().Add(5 * time.Second)
		for !cond(totals()) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s: %+v", what, totals())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	vip := fmt.Sprintf("127.0.0.1:%d", port)
	first, err := net.DialTimeout("tcp", vip, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	eventually("the first connection", func(c Counters) bool { return c.ConnectionsActive == 1 })
	// The second connection from the same address is reset: while dialling or at the first
	// read.
	second, err := net.DialTimeout("tcp", vip, 5*time.Second)
	if err == nil {
		defer second.Close()
		second.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = second.Read(make([]byte, 1))
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("the second connection is reset, got %v", err)
	}
	eventually("the refusal to be counted", func(c Counters) bool { return c.Limited == 1 })
	if c := totals(); c.Refused != 0 || c.Evicted != 0 || c.ConnectionsActive != 1 {
		t.Fatalf("only the limit refused: %+v", c)
	}
}

func TestDurationsRoundUpToMillisecondsAndLongWaitsAreClamped(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		want int64
	}{{0, 0}, {time.Microsecond, 1}, {time.Millisecond, 1}, {1500 * time.Microsecond, 2}, {-time.Second, -1000}} {
		if got := ceilMillis(c.d); got != c.want {
			t.Errorf("ceilMillis(%v) = %d, want %d", c.d, got, c.want)
		}
	}
	if got := uint32(waitMillis(100 * 24 * time.Hour)); got != math.MaxUint32 {
		t.Errorf("a 100-day wait is %d ms, want the most a uint32 holds", got)
	}
	if got := uint32(waitMillis(-time.Second)); got != 0 {
		t.Errorf("a negative wait is %d ms", got)
	}
	o := DefaultOptions()
	o.IdleTimeout = 500 * time.Microsecond
	p, err := New(o)
	if err != nil {
		t.Fatalf("a sub-millisecond idle timeout is 1 ms, not none or an error: %v", err)
	}
	p.Close()
	o.IdleTimeout = 50 * 24 * time.Hour
	if _, err := New(o); err == nil {
		t.Fatal("an idle timeout over 49.7 days is refused")
	}
}
