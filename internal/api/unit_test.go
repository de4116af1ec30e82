package api

import (
	"encoding/json"
	"encoding/xml"
	"os"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/jsonschema"
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
	if err := jsonschema.Validate(schema, empty); err != nil {
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
		if err := jsonschema.Validate(schema, []byte(bad)); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
}

func TestAutoUpdatePolicy(t *testing.T) {
	dir := t.TempDir()
	p := dir + "/auto-update"
	if got, err := ReadAutoUpdatePolicy(p); err != nil || got != AutoNone {
		t.Fatalf("missing file: %q %v", got, err)
	}
	for content, want := range map[string]string{
		"stage\n":                                AutoStage,
		"# comment\nAutomaticUpdatePolicy=apply": AutoApply,
		"AutomaticUpdatePolicy = check # daily":  AutoCheck,
		"none":                                   AutoNone,
		"reboot-now":                             "",
		"Policy=stage":                           "",
	} {
		os.WriteFile(p, []byte(content), 0o644)
		got, err := ReadAutoUpdatePolicy(p)
		if (want == "") != (err != nil) || got != want {
			t.Errorf("%q: %q, %v; want %q", content, got, err, want)
		}
	}
	if o, ok := ApplyAutoPolicy(AutoApply); !ok || !o.Apply {
		t.Error("apply policy does not apply")
	}
	if _, ok := ApplyAutoPolicy(AutoNone); ok {
		t.Error("none policy runs an upgrade")
	}
}

// The shipped polkit policy declares exactly the actions berthd checks,
// and the activation file starts berthd.service for org.berth1.
func TestShippedFilesMatchCode(t *testing.T) {
	b, err := os.ReadFile("../../data/polkit/org.berth1.policy")
	if err != nil {
		t.Fatal(err)
	}
	var pc struct {
		Actions []struct {
			ID string `xml:"id,attr"`
		} `xml:"action"`
	}
	if err := xml.Unmarshal(b, &pc); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, a := range pc.Actions {
		got = append(got, a.ID)
	}
	want := []string{ActionUpgrade, ActionSwitch, ActionRollback, ActionCleanup, ActionLocalChanges}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("policy actions %v, code checks %v", got, want)
	}
	for _, a := range kindAction {
		if !strings.Contains(string(b), `"`+a+`"`) {
			t.Errorf("job action %s not in the policy", a)
		}
	}
	svc, err := os.ReadFile("../../data/dbus/org.berth1.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{"Name=" + BusName, "SystemdService=berthd.service", "User=root"} {
		if !strings.Contains(string(svc), "\n"+line+"\n") {
			t.Errorf("org.berth1.service lacks %q", line)
		}
	}
	unit, err := os.ReadFile("../../units/berthd.service")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unit), "\nBusName="+BusName+"\n") || !strings.Contains(string(unit), "\nType=dbus\n") {
		t.Error("berthd.service is not a Type=dbus service for org.berth1")
	}
}
