package api

import (
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/godbus/dbus/v5"
)

func TestInterfaceXMLMatchesDocs(t *testing.T) {
	b, err := os.ReadFile("../../docs/org.berth1.xml")
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != InterfaceXML {
		t.Fatal("docs/org.berth1.xml and InterfaceXML differ: change them together")
	}
	// Both objects' introspection renders (nodeXML panics on a broken doc).
	for _, iface := range []string{ManagerInterface, JobInterface} {
		if x := nodeXML(iface, nil); len(x) < 100 {
			t.Fatalf("introspection of %s: %q", iface, x)
		}
	}
}

func TestParseOptions(t *testing.T) {
	v := dbus.MakeVariant
	for _, tc := range []struct {
		kind string
		in   map[string]dbus.Variant
		want UpgradeOptions
		err  bool
	}{
		{KindUpgrade, nil, UpgradeOptions{}, false},
		{KindUpgrade, map[string]dbus.Variant{"check": v(true)}, UpgradeOptions{Check: true}, false},
		{KindSwitch, map[string]dbus.Variant{"apply": v(true), "local": v("drop")}, UpgradeOptions{Apply: true, Local: "drop"}, false},
		{KindUpgrade, map[string]dbus.Variant{"check": v(true), "apply": v(true)}, UpgradeOptions{}, true},
		{KindUpgrade, map[string]dbus.Variant{"check": v("yes")}, UpgradeOptions{}, true},
		{KindUpgrade, map[string]dbus.Variant{"local": v("merge")}, UpgradeOptions{}, true},
		{KindUpgrade, map[string]dbus.Variant{"force": v(true)}, UpgradeOptions{}, true},
		{KindRollback, map[string]dbus.Variant{"apply": v(true)}, UpgradeOptions{Apply: true}, false},
		{KindRollback, map[string]dbus.Variant{"check": v(true)}, UpgradeOptions{}, true},
		{KindCleanup, map[string]dbus.Variant{"apply": v(true)}, UpgradeOptions{}, true},
	} {
		got, err := parseOptions(tc.kind, tc.in)
		if (err != nil) != tc.err || (!tc.err && got != tc.want) {
			t.Errorf("parseOptions(%s, %v) = %+v, %v; want %+v, error %v", tc.kind, tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestSplitRef(t *testing.T) {
	for in, want := range map[string]ImageReference{
		"docker://quay.io/x/y:1":   {"quay.io/x/y:1", "registry"},
		"quay.io/x/y:1":            {"quay.io/x/y:1", "registry"},
		"oci-archive:/tmp/a.tar":   {"/tmp/a.tar", "oci-archive"},
		"oci:/srv/layout:tag":      {"/srv/layout:tag", "oci"},
		"containers-storage:img:1": {"img:1", "containers-storage"},
	} {
		if got := SplitRef(in); got != want {
			t.Errorf("SplitRef(%q) = %+v, want %+v", in, got, want)
		}
	}
}

func TestSchemaValidatorRejects(t *testing.T) {
	schema, err := os.ReadFile("../../docs/status.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	empty, err := json.Marshal(&Host{APIVersion: StatusAPIVersion, Kind: StatusKind, Spec: HostSpec{BootOrder: "default"}, Status: HostStatus{Type: "berthHost", Berth: BerthStatus{Deployments: []*Deployment{}, Notes: []string{}}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := ValidateJSONSchema(schema, empty); err != nil {
		t.Fatalf("empty status: %v", err)
	}
	for _, bad := range []string{
		`{}`,
		strings.Replace(string(empty), `"BootcHost"`, `"Host"`, 1),
		strings.Replace(string(empty), `"bootOrder":"default"`, `"bootOrder":"sideways"`, 1),
		strings.Replace(string(empty), `"notes":[]`, `"notes":[1]`, 1),
		strings.Replace(string(empty), `"rollbackQueued":false`, `"rollbackQueued":false,"extra":1`, 1),
		strings.Replace(string(empty), `"deployments":[]`, `"deployments":[{"id":"x"}]`, 1),
	} {
		if err := ValidateJSONSchema(schema, []byte(bad)); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
}
