// Command etcd runs the etcd server of the release Kubernetes pins, so the local
// cluster is built from one module graph.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
