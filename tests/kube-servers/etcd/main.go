// Command etcd is etcd's server, built from its server module at the version that
// kube-apiserver's release was tested with (see go.mod).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
