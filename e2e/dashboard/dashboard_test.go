// Checks the chart's Grafana dashboard (charts/snooze/files/dashboard.json) with
// Grafana's own schema types, from the grafana-foundation-sdk: a strict decode (no
// unknown field, every field of the right type, panel options and queries decoded by
// the types of their panel and datasource plugins) and the SDK's validation. Run by
// .ci/dashboard.
package dashboard

import (
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
	"github.com/grafana/grafana-foundation-sdk/go/prometheus"
)

const file = "../../charts/snooze/files/dashboard.json"

// failed: the SDK returns an empty cog.BuildErrors (a non-nil error value) on success.
func failed(err error) bool {
	var be cog.BuildErrors
	if errors.As(err, &be) {
		return len(be) > 0
	}
	return err != nil
}

func load(t *testing.T) dashboard.Dashboard {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	plugins.RegisterDefaultPlugins()
	var strict dashboard.Dashboard
	if err := strict.UnmarshalJSONStrict(raw); failed(err) {
		t.Fatalf("%s does not decode strictly as a Grafana dashboard: %v", file, err)
	}
	// The strict decoder of v0.0.22 reports errors but leaves out panels that decode
	// without one (it returns an empty error list as a non-nil error); the plain
	// decoder fills them in for the checks below.
	var d dashboard.Dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	if err := d.Validate(); failed(err) {
		t.Fatalf("%s: %v", file, err)
	}
	return d
}

func TestDashboardMatchesGrafanaSchema(t *testing.T) {
	d := load(t)
	if d.Uid == nil || *d.Uid == "" || d.Title == nil || *d.Title == "" {
		t.Fatal("the dashboard needs a uid and a title")
	}
	queries := 0
	for _, p := range d.Panels {
		panel := p.Panel
		if panel == nil {
			continue // a row
		}
		if panel.Title == nil || *panel.Title == "" {
			t.Errorf("panel %v has no title", panel.Id)
		}
		if panel.Datasource == nil || panel.Datasource.Uid == nil || *panel.Datasource.Uid != "${datasource}" {
			t.Errorf("panel %q: its datasource must be the ${datasource} variable", *panel.Title)
		}
		if len(panel.Targets) == 0 {
			t.Errorf("panel %q has no query", *panel.Title)
		}
		for _, target := range panel.Targets {
			q, ok := target.(*prometheus.Dataquery)
			if !ok {
				t.Errorf("panel %q: query %T is not a Prometheus query", *panel.Title, target)
				continue
			}
			if strings.TrimSpace(q.Expr) == "" {
				t.Errorf("panel %q: empty expression", *panel.Title)
			}
			queries++
		}
	}
	if queries < 10 {
		t.Fatalf("only %d queries", queries)
	}
	t.Logf("%d panels, %d Prometheus queries", len(d.Panels), queries)
}
