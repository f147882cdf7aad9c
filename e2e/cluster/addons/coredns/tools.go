//go:build tools

// Package tools pins CoreDNS: build.sh builds github.com/coredns/coredns from this
// module (go.mod/go.sum hold the versions the module proxy serves).
package tools

import _ "github.com/coredns/coredns"
