package localchanges_test

import (
	"reflect"
	"testing"

	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/localchanges"
	"github.com/berth-dev/berth/internal/setuproot"
)

// What reset and commit leave alone must be what berth-init binds from
// berth/state at boot.
func TestSharedListsMatchSetuproot(t *testing.T) {
	if !reflect.DeepEqual(localchanges.PerDeployment, setuproot.DefaultPerDeployment) {
		t.Errorf("PerDeployment %v, setuproot.DefaultPerDeployment %v", localchanges.PerDeployment, setuproot.DefaultPerDeployment)
	}
	var names []string
	for _, s := range deploy.DefaultShared {
		names = append(names, s.Name)
	}
	if !reflect.DeepEqual(names, setuproot.DefaultShared) {
		t.Errorf("deploy.DefaultShared %v, setuproot.DefaultShared %v", names, setuproot.DefaultShared)
	}
	for rel, want := range map[string]bool{"var": false, "var/lib": false, "var/lib/dpkg/status": false, "var/log": true, "home/u": true, "etc": false, "variable": false} {
		if got := localchanges.SharedState(rel); got != want {
			t.Errorf("SharedState(%q) = %v", rel, got)
		}
	}
}
