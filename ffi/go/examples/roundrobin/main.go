// Embeds svcproxy in a Go program: two backends, a service in front of them, six connections
// that go round robin. Run from the repository root:
//
//	cargo build --release -p svcproxy-ffi
//	cd ffi/go && CGO_LDFLAGS="-L$PWD/../../target/release" go run ./examples/roundrobin
package main

import (
	"bufio"
	"fmt"
	"log"
	"net"
	"time"

	svcproxy "github.com/svcproxy/svcproxy/ffi/go"
)

func serve(name string) net.Listener {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, name)
			c.Close()
		}
	}()
	return l
}

func main() {
	alpha, bravo := serve("alpha"), serve("bravo")
	probe, _ := net.Listen("tcp", "127.0.0.1:0")
	port := uint16(probe.Addr().(*net.TCPAddr).Port)
	probe.Close()

	p, err := svcproxy.New(svcproxy.DefaultOptions())
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	_, err = p.Apply(svcproxy.Batch{Upsert: []svcproxy.Service{{
		Name:      "demo/web",
		Addresses: []string{"127.0.0.1"},
		Ports:     []svcproxy.Port{{Port: port}},
		Endpoints: svcproxy.Endpoints(
			svcproxy.Endpoint{Address: alpha.Addr().String()},
			svcproxy.Endpoint{Address: bravo.Addr().String()},
		),
	}}})
	if err != nil {
		log.Fatal(err)
	}
	if err := p.Start(); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("svcproxy %s on 127.0.0.1:%d (%s backend)\n", svcproxy.Version(), port, p.Backend())
	for i := 1; i <= 6; i++ {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			log.Fatal(err)
		}
		name, _ := bufio.NewReader(c).ReadString('\n')
		c.Close()
		fmt.Printf("connection %d answered by %s", i, name)
	}
	stats, _ := p.Stats()
	fmt.Printf("%s: %d connections\n", stats[0].Service, stats[0].Totals.ConnectionsTotal)
	p.Shutdown(time.Second)
}
