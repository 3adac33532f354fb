package svcproxy

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"
)

// Many goroutines share one proxy: each changes its own service, reads the table and the
// statistics, waits for the workers and sends traffic, while the proxy runs; then one closes
// it while the others go on, and every call after that fails cleanly. Run with -race.
func TestOneProxyFromManyGoroutines(t *testing.T) {
	a := backend(t)
	p := newProxy(t)
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	const goroutines, rounds = 8, 20
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for g := 0; g < goroutines; g++ {
		port := freePort(t)
		wg.Add(1)
		go func(g int, port uint16) {
			defer wg.Done()
			errs <- func() error {
				name := fmt.Sprintf("go/concurrent-%d", g)
				for r := 0; r < rounds; r++ {
					svc := Service{Name: name, Addresses: []string{"127.0.0.1"}, Ports: []Port{{Port: port}},
						Endpoints: Endpoints(Endpoint{Address: a.Addr().String(), Weight: uint32(r + 1)})}
					if _, err := p.Apply(Batch{Upsert: []Service{svc}}); err != nil {
						return fmt.Errorf("apply: %w", err)
					}
					if _, err := p.Sync(5 * time.Second); err != nil {
						return fmt.Errorf("sync: %w", err)
					}
					if _, err := p.Stats(); err != nil {
						return fmt.Errorf("stats: %w", err)
					}
					if _, err := p.Table(); err != nil {
						return fmt.Errorf("table: %w", err)
					}
					c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
					if err != nil {
						return fmt.Errorf("connect: %w", err)
					}
					c.Close()
				}
				return nil
			}()
		}(g, port)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	table, err := p.Table()
	if err != nil || len(table.Services) != goroutines {
		t.Fatalf("table after the goroutines: %d services, %v", len(table.Services), err)
	}

	// Close races the others' calls: each call either works or says the proxy is closed.
	start := make(chan struct{})
	var closing sync.WaitGroup
	for g := 0; g < goroutines; g++ {
		closing.Add(1)
		go func(g int) {
			defer closing.Done()
			<-start
			for r := 0; r < rounds; r++ {
				var e *Error
				if _, err := p.Stats(); err != nil && !(errors.As(err, &e) && e.Code == CodeState) {
					t.Errorf("stats while closing: %v", err)
				}
				if g == 0 && r == rounds/2 {
					p.Close()
				}
			}
		}(g)
	}
	close(start)
	closing.Wait()
	var e *Error
	if _, err := p.Stats(); !errors.As(err, &e) || e.Code != CodeState {
		t.Fatalf("a call after Close: %v", err)
	}
}
