package svcproxy

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// cgroupForTest moves this test process into a cgroup v2 directory of its own, and back to
// where it was (removing the directory) at cleanup. Root only; under CI it must not skip.
func cgroupForTest(t *testing.T) string {
	t.Helper()
	needRoot(t, "socket-level load balancing")
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	mount := ""
	for _, line := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(line); len(f) > 2 && f[2] == "cgroup2" {
			mount = f[1]
			break
		}
	}
	if mount == "" {
		t.Fatal("cgroup v2 is not mounted")
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	home := ""
	for _, line := range strings.Split(string(self), "\n") {
		if strings.HasPrefix(line, "0::") {
			home = filepath.Join(mount, strings.TrimPrefix(line, "0::"))
		}
	}
	dir := filepath.Join(mount, fmt.Sprintf("svcproxy-go-test-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	pid := []byte(strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), pid, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.WriteFile(filepath.Join(home, "cgroup.procs"), pid, 0o644); err != nil {
			t.Error(err)
		}
		if err := os.Remove(dir); err != nil {
			t.Error(err)
		}
	})
	return dir
}

func TestSocketLBConnectsStraightToTheEndpoint(t *testing.T) {
	cgroup := cgroupForTest(t)
	a, b := backend(t), backend(t)
	p := newProxy(t)
	port := freePort(t)
	vip := fmt.Sprintf("127.0.0.1:%d", port)
	if _, err := p.Apply(Batch{Upsert: []Service{{
		Name:      "go/web",
		Addresses: []string{"127.0.0.1"},
		Ports:     []Port{{Port: port}},
		Endpoints: Endpoints(Endpoint{Address: a.Addr().String()}, Endpoint{Address: b.Addr().String()}),
	}}}); err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	if err := p.AttachSocketLB(cgroup); err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for i := 0; i < 4; i++ {
		c, err := net.DialTimeout("tcp", vip, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		f := strings.Fields(line)
		if c.RemoteAddr().String() != vip {
			t.Fatalf("getpeername shows %s, not the service %s", c.RemoteAddr(), vip)
		}
		if f[1] != c.LocalAddr().String() {
			t.Fatalf("the endpoint saw %s, not the client %s: the connection went through a proxy", f[1], c.LocalAddr())
		}
		seen[f[0]]++
	}
	if seen[a.Addr().String()] != 2 || seen[b.Addr().String()] != 2 {
		t.Fatalf("round robin: %v", seen)
	}
	stats, err := p.Stats()
	if err != nil || len(stats) != 1 || stats[0].Totals.ConnectionsTotal != 4 {
		t.Fatalf("stats count what the socket balanced: %+v %v", stats, err)
	}
	if err := p.DetachSocketLB(); err != nil {
		t.Fatal(err)
	}
	// Through the proxy again: the endpoint sees the proxy's connection.
	c, err := net.DialTimeout("tcp", vip, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if f := strings.Fields(line); len(f) != 2 || f[1] == c.LocalAddr().String() {
		t.Fatalf("after detaching, the proxy serves: %q", line)
	}
}
