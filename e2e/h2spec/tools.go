//go:build tools

// Package tools pins h2spec (summerwind/h2spec), the HTTP/2 conformance suite that the
// activator tests run against a service through the activator; e2e/cluster/build.sh
// builds its command from this module's go.sum.
package tools

import _ "github.com/summerwind/h2spec/cmd/h2spec"
