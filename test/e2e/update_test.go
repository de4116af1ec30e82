package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"regexp"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/berth-dev/berth/internal/api"
	"github.com/berth-dev/berth/test/e2e/harness"
)

// The update lane (scenarios 5–8): the trixie image is v1; v2, v3 and v4 are v1 plus
// one layer each, served by a registry in this process on the host's 127.0.0.1, which
// the guest reaches as 10.0.2.2 through qemu's user network.
const (
	issueV2     = "Debian GNU/Linux (berth e2e v2) \\n \\l\n"
	issueLocal  = "local issue made on v1\n"
	profileV2   = "# dot.profile of image v2\n"
	motdLocal   = "local motd made on v1\n"
	releaseV2   = "v2\n"
	asidePath   = "usr/share/base-files/dot.profile"
	failMessage = "berth e2e: v3 is broken on purpose"
	bigFileSize = 160 << 20 // v4's layer: long enough an import to cut power in
	updateRepo  = "berth/e2e"
)

// updateRegistry serves the update images; base is the installed trixie archive.
type updateRegistry struct {
	*harness.Registry
	base v1.Image
}

func startRegistry(t *testing.T, archive string) *updateRegistry {
	t.Helper()
	r := &updateRegistry{Registry: serveRegistry(t)}
	var err error
	if r.base, err = harness.ArchiveImage(archive, t.TempDir()); err != nil {
		t.Fatal(err)
	}
	return r
}

// serveRegistry runs a registry on 127.0.0.1 until the test ends.
func serveRegistry(t *testing.T) *harness.Registry {
	t.Helper()
	r, err := harness.ServeRegistry(updateRepo)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// push makes base + layers the registry's :latest and returns it.
func (r *updateRegistry) push(t *testing.T, base v1.Image, layers ...[]harness.LayerFile) v1.Image {
	t.Helper()
	img, err := r.Push(base, layers...)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := img.Digest()
	t.Logf("registry: %s is %s", r.HostRef(), d)
	return img
}

var v2Files = []harness.LayerFile{
	{Path: "etc/berth-e2e-release", Mode: 0o644, Data: []byte(releaseV2)},
	{Path: "etc/issue", Mode: 0o644, Data: []byte(issueV2)},
	{Path: asidePath, Mode: 0o644, Data: []byte(profileV2)},
	{Path: "usr/share/berth-e2e", Mode: 0o755, Dir: true},
	{Path: "usr/share/berth-e2e/v2", Mode: 0o644, Data: []byte("v2\n")},
}

var v3Files = []harness.LayerFile{
	{Path: "usr/lib/berth", Mode: 0o755, Dir: true},
	{Path: "usr/lib/berth/health.d", Mode: 0o755, Dir: true},
	{Path: "usr/lib/berth/health.d/50-e2e-fail", Mode: 0o755, Data: []byte("#!/bin/sh\necho '" + failMessage + "' >&2\nexit 1\n")},
	{Path: "etc/berth-e2e-release", Mode: 0o644, Data: []byte("v3\n")},
}

func v4Files() []harness.LayerFile {
	big := make([]byte, bigFileSize)
	rng := rand.New(rand.NewPCG(4, 4))
	for i := 0; i+8 <= len(big); i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8; j++ {
			big[i+j] = byte(v >> (8 * j))
		}
	}
	return []harness.LayerFile{
		{Path: "etc/berth-e2e-release", Mode: 0o644, Data: []byte("v4\n")},
		{Path: "usr/share/berth-e2e", Mode: 0o755, Dir: true},
		{Path: "usr/share/berth-e2e/big", Mode: 0o644, Data: big},
	}
}

// status reads `berth status --json` in the guest.
func (g *guest) status(t *testing.T) *api.Host {
	t.Helper()
	out := g.must(t, "berth status --json")
	var h api.Host
	if err := json.Unmarshal([]byte(out), &h); err != nil {
		t.Fatalf("berth status --json: %v\n%s", err, out)
	}
	return &h
}

func bootedID(h *api.Host) string {
	if h.Status.Booted == nil || h.Status.Booted.Berth == nil {
		return ""
	}
	return h.Status.Booted.Berth.ID
}

// waitJob waits until the job record says job id ended, and returns it.
func (g *guest) waitJob(t *testing.T, id uint64, timeout time.Duration) *api.JobRecord {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		h := g.status(t)
		if j := h.Status.Berth.LastJob; j != nil && j.ID >= id && j.State != "running" {
			return j
		}
		if j := h.Status.Berth.ActiveJob; j != nil {
			t.Logf("job %s: %s %d/%d", j.Path, j.Phase, j.Done, j.Total)
		}
		time.Sleep(5 * time.Second)
	}
	failWithLogs(t, g.vm, "job %d did not end within %s", id, timeout)
	return nil
}

// waitHealth waits for berth-healthcheck.service to end and returns its state.
func (g *guest) waitHealth(t *testing.T) string {
	t.Helper()
	return strings.TrimSpace(g.must(t, `for i in $(seq 300); do s=$(systemctl is-active berth-healthcheck.service); case $s in active|failed) echo $s; exit 0;; esac; sleep 2; done; echo timeout`))
}

// upgradeViaBusctl starts Upgrade through D-Bus and returns the job number.
func (g *guest) upgradeViaBusctl(t *testing.T) uint64 {
	t.Helper()
	out := g.must(t, "busctl call org.berth1 /org/berth1 org.berth1.Manager Upgrade 'a{sv}' 0")
	m := regexp.MustCompile(`/org/berth1/job/(\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("Upgrade returned %q, want a job path", out)
	}
	var n uint64
	fmt.Sscan(m[1], &n)
	return n
}

func (g *guest) bootUEFI(t *testing.T, label string) {
	t.Helper()
	g.stop(t)
	g.vm = g.bootRetry(t, harness.BootOptions{Label: label, Timeout: bootTimeout})
}

// TestUpdate runs scenarios 5–8 on the trixie image: upgrade over D-Bus with the /etc
// merge, rollback, automatic rollback of an unhealthy update, and a power cut during an
// upgrade.
func TestUpdate(t *testing.T) {
	setup(t)
	img := guestImage(t, harness.Trixie)
	reg := startRegistry(t, img.Archive)
	g := installGuest(t, "update", harness.Trixie, "--target-imgref", reg.GuestRef())
	if g == nil {
		return
	}
	defer g.stop(t)
	var v1ID, v2ID string
	v2 := reg.push(t, reg.base, v2Files)

	ok := step(t, "update/5-upgrade", func(t *testing.T) {
		g.bootUEFI(t, "5-v1")
		if s := g.waitHealth(t); s != "active" {
			t.Errorf("health check on v1: %s\n%s", s, g.check(t, "health log", "journalctl -b -u berth-healthcheck --no-pager | tail -20"))
		}
		h := g.status(t)
		v1ID = bootedID(h)
		if v1ID == "" {
			t.Fatalf("berth status names no booted deployment")
		}
		if be := h.Status.Booted.Berth.BootEntry; be == nil || be.State != "good" {
			t.Errorf("v1's boot entry after a healthy boot: %+v, want good (blessed)", be)
		}
		if h.Status.Berth.ESP == "" {
			t.Errorf("berth found no ESP on the running system: %v", h.Status.Berth.Notes)
		}
		// Local changes on v1: /etc only here, /etc changed by both, /usr only here,
		// /usr changed by both; and the registry the guest updates from.
		g.must(t, fmt.Sprintf(`set -e
printf %q > /etc/motd
printf %q > /etc/issue
mkdir -p /usr/local/bin /etc/containers/registries.conf.d
printf %q > /usr/local/bin/hello; chmod 0755 /usr/local/bin/hello
echo '# local line' >> /%s
printf %q > /etc/containers/registries.conf.d/50-berth-e2e.conf
sync`, motdLocal, issueLocal, helloBody, asidePath, reg.GuestRegistriesConf()))
		job := g.upgradeViaBusctl(t)
		rec := g.waitJob(t, job, 20*time.Minute)
		t.Logf("upgrade job: %s %s%s", rec.State, rec.Summary, rec.Error)
		if rec.State != "done" || !strings.Contains(rec.Summary, "staged") {
			failWithLogs(t, g.vm, "upgrade job %d: %s: %s%s\n%s", job, rec.State, rec.Summary, rec.Error, g.check(t, "berthd log", "journalctl -u berthd --no-pager | tail -40"))
		}
		h = g.status(t)
		if h.Status.Staged == nil || h.Status.Staged.Berth == nil {
			t.Fatalf("no staged deployment after the upgrade")
		}
		v2ID = h.Status.Staged.Berth.ID
		d2, _ := v2.Digest()
		if h.Status.Staged.Berth.ManifestDigest != d2.String() {
			t.Errorf("staged manifest %s, want v2 %s", h.Status.Staged.Berth.ManifestDigest, d2)
		}

		g.bootUEFI(t, "5-v2")
		h = g.status(t)
		if bootedID(h) != v2ID {
			t.Fatalf("booted %q after the upgrade, want v2 %s", bootedID(h), v2ID)
		}
		if cl := g.check(t, "cmdline", "cat /proc/cmdline"); !strings.Contains(cl, "console=ttyS0,115200") {
			t.Errorf("v2's kernel command line lost the install's --karg: %s", cl)
		}
		got := g.check(t, "v2 and carried changes", "cat /etc/berth-e2e-release /usr/share/berth-e2e/v2 /etc/motd /usr/local/bin/hello")
		if want := releaseV2 + "v2\n" + motdLocal + helloBody; got != want {
			t.Errorf("on v2:\n%s\nwant:\n%s", got, want)
		}
		if got := g.check(t, "conflict: local /etc/issue kept", "cat /etc/issue; echo ---; cat /etc/issue.berth-new"); got != issueLocal+"---\n"+issueV2 {
			t.Errorf("/etc/issue (changed on both sides):\n%s\nwant the local version, and the image's beside it", got)
		}
		if b := h.Status.Booted.Berth; !contains(b.Conflicts, "issue") && !contains(b.Conflicts, "/etc/issue") {
			t.Errorf("berth status lists conflicts %v, want /etc/issue", b.Conflicts)
		}
		if got := g.check(t, "changed in the image: not applied", "cat /"+asidePath); got != profileV2 {
			t.Errorf("/%s = %q, want the new image's version (the local change is kept aside)", asidePath, got)
		}
		text := g.check(t, "status text", "berth status")
		t.Logf("berth status:\n%s", text)
		if !strings.Contains(text, asidePath) {
			t.Errorf("berth status does not report the local change to /%s kept aside", asidePath)
		}
		if s := g.waitHealth(t); s != "active" {
			t.Errorf("health check on v2: %s", s)
		}
	})
	if !ok || g.vm == nil || v2ID == "" {
		return
	}

	ok = step(t, "update/6-rollback", func(t *testing.T) {
		out := g.must(t, "berth rollback")
		t.Logf("berth rollback: %s", out)
		g.bootUEFI(t, "6-rollback-v1")
		h := g.status(t)
		if bootedID(h) != v1ID {
			t.Fatalf("booted %q after rollback, want v1 %s", bootedID(h), v1ID)
		}
		got := g.check(t, "v1 as it was", "cat /etc/motd /etc/issue; test ! -e /etc/berth-e2e-release && test ! -e /usr/share/berth-e2e && tail -1 /"+asidePath)
		if want := motdLocal + issueLocal + "# local line\n"; got != want {
			t.Errorf("v1 after rollback:\n%s\nwant:\n%s", got, want)
		}
		// Back to v2 for scenario 7: rollback again swaps the default back.
		g.must(t, "berth rollback")
		g.bootUEFI(t, "6-back-to-v2")
		if id := bootedID(g.status(t)); id != v2ID {
			t.Fatalf("booted %q, want v2 %s again", id, v2ID)
		}
	})
	if !ok || g.vm == nil {
		return
	}

	ok = step(t, "update/7-auto-rollback", func(t *testing.T) {
		reg.push(t, v2, v3Files)
		out := g.must(t, "berth upgrade")
		t.Logf("berth upgrade: %s", out)
		h := g.status(t)
		if h.Status.Staged == nil || h.Status.Staged.Berth == nil {
			t.Fatalf("v3 is not staged")
		}
		v3ID := h.Status.Staged.Berth.ID
		g.stop(t)
		// Each boot of v3 fails its health check and reboots by itself (qemu runs with
		// -no-reboot, so the reboot ends qemu); the third uses up the entry's tries.
		for i := 1; i <= 3; i++ {
			label := fmt.Sprintf("7-v3-try%d", i)
			vm, err := g.m.Boot(context.Background(), harness.BootOptions{Label: label, Timeout: bootTimeout})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := vm.WaitSerial(regexp.MustCompile(regexp.QuoteMeta("rebooting so the boot loader counts")), 12*time.Minute); err != nil {
				failWithLogs(t, vm, "v3 boot %d: no self-reboot after the failed health check: %v", i, err)
			}
			if err := vm.Wait(3 * time.Minute); err != nil && !vm.Exited() {
				vm.Kill()
				failWithLogs(t, vm, "v3 boot %d did not reboot: %v", i, err)
			}
			if !strings.Contains(harness.Tail(vm.Serial, 400), failMessage) {
				t.Errorf("v3 boot %d: the failing check's message is not on the console", i)
			}
		}
		g.vm = g.bootRetry(t, harness.BootOptions{Label: "7-fallback", Timeout: bootTimeout})
		g.waitHealth(t)
		h = g.status(t)
		if bootedID(h) != v2ID {
			t.Fatalf("booted %q after three failed boots of v3, want v2 %s", bootedID(h), v2ID)
		}
		text := g.check(t, "status", "berth status")
		t.Logf("berth status:\n%s", text)
		if !strings.Contains(text, v3ID) || !strings.Contains(text, "abandoned") || !strings.Contains(text, "50-e2e-fail") {
			t.Errorf("berth status does not say that %s was abandoned and why:\n%s", v3ID, text)
		}
		for _, d := range h.Status.Berth.Deployments {
			if d.ID == v3ID && d.State != "failed" {
				t.Errorf("v3 deployment state %q, want failed", d.State)
			}
		}
	})
	if !ok || g.vm == nil {
		return
	}

	step(t, "update/8-power-cut", func(t *testing.T) {
		reg.push(t, v2, v4Files())
		job := g.upgradeViaBusctl(t)
		// Cut the power while the job imports v4's big layer.
		deadline := time.Now().Add(10 * time.Minute)
		cut := false
		for !cut && time.Now().Before(deadline) {
			h := g.status(t)
			if j := h.Status.Berth.ActiveJob; j != nil && strings.HasPrefix(j.Phase, "pull") && j.Done > 0 {
				t.Logf("cutting power during %s %d/%d", j.Phase, j.Done, j.Total)
				g.vm.Kill()
				g.vm = nil
				cut = true
				break
			}
			if j := h.Status.Berth.LastJob; j != nil && j.ID >= job && j.State != "running" {
				t.Fatalf("the upgrade ended (%s) before the power could be cut during its import", j.State)
			}
			time.Sleep(time.Second)
		}
		if !cut {
			t.Fatal("the upgrade job never reported import progress")
		}
		g.bootUEFI(t, "8-after-cut")
		h := g.status(t)
		if bootedID(h) != v2ID {
			t.Fatalf("booted %q after the power cut, want v2 %s", bootedID(h), v2ID)
		}
		out, err := g.vm.SSH(context.Background(), "berth fsck")
		t.Logf("berth fsck:\n%s", out)
		if err != nil {
			t.Errorf("berth fsck after the power cut: %v", err)
		}
		out = g.must(t, "berth upgrade")
		t.Logf("berth upgrade (again): %s", out)
		h = g.status(t)
		if h.Status.Staged == nil || h.Status.Staged.Berth == nil {
			t.Fatalf("the rerun upgrade staged nothing")
		}
		if out, err := g.vm.SSH(context.Background(), "berth fsck"); err != nil {
			t.Errorf("berth fsck after the rerun: %v\n%s", err, out)
		}
	})
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
