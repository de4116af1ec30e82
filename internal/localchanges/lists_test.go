package localchanges_test

import (
	"testing"

	"github.com/berth-dev/berth/internal/localchanges"
)

// What reset and commit leave alone is what berth-init binds from
// berth/state at boot (both read store.SharedDirs and store.PerDeployment).
func TestSharedStateIsWhatBerthInitBinds(t *testing.T) {
	for rel, want := range map[string]bool{"var": false, "var/lib": false, "var/lib/dpkg/status": false, "var/log": true, "home/u": true, "etc": false, "variable": false} {
		if got := localchanges.SharedState(rel); got != want {
			t.Errorf("SharedState(%q) = %v", rel, got)
		}
	}
}
