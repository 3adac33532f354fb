// Command controller is what a Go program embedding svcproxy writes to be a node's service
// proxy: client-go informers watch Services and EndpointSlices, and every change of a
// service or of its slices is applied to the embedded proxy as one batch.
//
//	CGO_LDFLAGS=-L$REPO/target/release go run . -kubeconfig ~/.kube/config -node "$(hostname)"
//
// It serves each service's cluster IPs, external IPs and load balancer IPs on this host's
// addresses (they must be local: a dummy interface or a local route), with per-frontend
// listeners. It prints "synced" once the first full view of the API is applied.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os/signal"
	"syscall"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	listersdiscoveryv1 "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/workqueue"

	svcproxy "github.com/svcproxy/svcproxy/ffi/go"
)

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig file (empty: in-cluster)")
	node := flag.String("node", "", "this node's name (for traffic policy Local)")
	workers := flag.Int("workers", 0, "proxy worker threads (0: one per CPU)")
	flag.Parse()

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		log.Fatalf("kubeconfig: %v", err)
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		log.Fatalf("client: %v", err)
	}
	options := svcproxy.DefaultOptions()
	options.NodeName = *node
	options.Workers = *workers
	proxy, err := svcproxy.New(options)
	if err != nil {
		log.Fatalf("proxy: %v", err)
	}
	defer proxy.Close()
	if err := proxy.Start(); err != nil {
		log.Fatalf("start: %v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, client, proxy); err != nil {
		log.Fatal(err)
	}
	if err := proxy.Shutdown(5 * time.Second); err != nil {
		log.Printf("shutdown: %v", err)
	}
}

// controller keeps the proxy's table equal to what the listers hold.
type controller struct {
	services listerscorev1.ServiceLister
	slices   listersdiscoveryv1.EndpointSliceLister
	proxy    *svcproxy.Proxy
	queue    workqueue.TypedRateLimitingInterface[string]
}

func run(ctx context.Context, client kubernetes.Interface, proxy *svcproxy.Proxy) error {
	factory := informers.NewSharedInformerFactory(client, 0)
	services := factory.Core().V1().Services()
	slices := factory.Discovery().V1().EndpointSlices()
	c := &controller{
		services: services.Lister(),
		slices:   slices.Lister(),
		proxy:    proxy,
		queue:    workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]()),
	}
	defer c.queue.ShutDown()
	enqueue := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			c.queue.Add(key)
		}
	}
	if _, err := services.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
		DeleteFunc: enqueue,
	}); err != nil {
		return err
	}
	// A slice change is a change of the service it belongs to.
	bySlice := func(obj any) {
		if tombstone, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = tombstone.Obj
		}
		if s, ok := obj.(*discoveryv1.EndpointSlice); ok {
			if name := s.Labels[discoveryv1.LabelServiceName]; name != "" {
				c.queue.Add(s.Namespace + "/" + name)
			}
		}
	}
	if _, err := slices.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    bySlice,
		UpdateFunc: func(_, obj any) { bySlice(obj) },
		DeleteFunc: bySlice,
	}); err != nil {
		return err
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	for informer, synced := range factory.WaitForCacheSync(ctx.Done()) {
		if !synced {
			return fmt.Errorf("%v did not sync", informer)
		}
	}
	for c.queue.Len() > 0 {
		c.next()
	}
	fmt.Println("synced")
	go func() {
		<-ctx.Done()
		c.queue.ShutDown()
	}()
	for c.next() {
	}
	return nil
}

// next applies the service of the next key in the queue; false once the queue is shut down.
func (c *controller) next() bool {
	key, shutdown := c.queue.Get()
	if shutdown {
		return false
	}
	defer c.queue.Done(key)
	if err := c.sync(key); err != nil {
		log.Printf("%s: %v (retried)", key, err)
		c.queue.AddRateLimited(key)
		return true
	}
	c.queue.Forget(key)
	return true
}

// sync makes the proxy serve service key ("namespace/name") as the listers hold it, or not
// at all when it is gone or not proxied.
func (c *controller) sync(key string) error {
	namespace, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil
	}
	service, err := c.services.Services(namespace).Get(name)
	if err == nil {
		slices, err := c.slices.EndpointSlices(namespace).List(labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: name}))
		if err != nil {
			return err
		}
		if s, ok := translate(service, slices); ok {
			_, err := c.proxy.Apply(svcproxy.Batch{Upsert: []svcproxy.Service{s}})
			return err
		}
	}
	_, err = c.proxy.Apply(svcproxy.Batch{Remove: []string{key}})
	var e *svcproxy.Error
	if errors.As(err, &e) && e.Code == svcproxy.CodeUnknownService {
		return nil
	}
	return err
}
