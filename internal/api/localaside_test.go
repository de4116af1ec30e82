package api

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/etcmerge"
	"github.com/berth-dev/berth/internal/store"
)

// TestStatusLocalAside checks that the first boot's reports (conflicts.json,
// local-aside.json, written by etcmerge.Prepare) reach the status.
func TestStatusLocalAside(t *testing.T) {
	l := store.At(t.TempDir())
	id := "2-0123456789ab"
	dir := l.Deployment(id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	la := etcmerge.LocalAside{Version: 1, From: "1-0123456789ab", Aside: []etcmerge.Aside{
		{Path: "/usr/lib/changed", Kind: "modify/modify", Kept: "local-aside/usr/lib/changed"},
		{Path: "/opt/app", Kind: "delete/modify"},
	}}
	b, _ := json.Marshal(la)
	if err := os.WriteFile(filepath.Join(dir, etcmerge.LocalAsideFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	d := fromDeploy(l, &deploy.Deployment{ID: id})
	if strings.Join(d.LocalAside, " ") != "/usr/lib/changed /opt/app" {
		t.Fatalf("localAside %v", d.LocalAside)
	}
	out, _ := json.Marshal(d)
	if !strings.Contains(string(out), `"localAside":["/usr/lib/changed","/opt/app"]`) {
		t.Fatalf("status JSON %s", out)
	}
	if d := fromDeploy(l, &deploy.Deployment{ID: "3-0123456789ab"}); d.LocalAside != nil {
		t.Fatalf("no local-aside.json: %v", d.LocalAside)
	}
}
