package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	ggtypes "github.com/google/go-containerregistry/pkg/v1/types"

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

type layerFile struct {
	path string
	mode int64
	data []byte
	dir  bool
}

// layerOf makes an OCI layer (gzip) holding files.
func layerOf(files []layerFile) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	for _, f := range files {
		h := &tar.Header{Name: f.path, Mode: f.mode, ModTime: mtime, Format: tar.FormatPAX}
		if f.dir {
			h.Typeflag, h.Name = tar.TypeDir, f.path+"/"
		} else {
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil },
		tarball.WithMediaType(ggtypes.OCILayer), tarball.WithCompressionLevel(1))
}

// updateRegistry serves the update images.
type updateRegistry struct {
	port int
	srv  *http.Server
	base v1.Image
}

func startRegistry(t *testing.T, archive string) *updateRegistry {
	t.Helper()
	r := &updateRegistry{}
	r.port, r.srv = serveRegistry(t)
	// The base is the installed oci-archive: unpack it as an OCI layout.
	dir := t.TempDir()
	if err := untar(archive, dir); err != nil {
		t.Fatalf("unpack %s: %v", archive, err)
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) == 0 {
		t.Fatalf("%s: no image in its index: %v", archive, err)
	}
	if r.base, err = idx.Image(im.Manifests[0].Digest); err != nil {
		t.Fatal(err)
	}
	return r
}

// serveRegistry runs a registry on 127.0.0.1 until the test ends.
func serveRegistry(t *testing.T) (int, *http.Server) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: registry.New(registry.Logger(log.New(io.Discard, "", 0)))}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port, srv
}

// untar unpacks an archive the lane itself wrote (not hostile input).
func untar(archive, dir string) error {
	f, err := os.Open(archive)
	if err != nil {
		return err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dir, filepath.Clean("/"+h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			os.MkdirAll(filepath.Dir(p), 0o755)
			out, err := os.Create(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(out, tr)
			out.Close()
			if err != nil {
				return err
			}
		}
	}
}

// guestRef is how the guest names the image; hostRef how this process pushes it.
func (r *updateRegistry) guestRef() string {
	return fmt.Sprintf("docker://10.0.2.2:%d/%s:latest", r.port, updateRepo)
}

// push makes base + layers the registry's :latest and returns its manifest digest.
func (r *updateRegistry) push(t *testing.T, base v1.Image, layers ...[]layerFile) v1.Image {
	t.Helper()
	img := base
	for _, files := range layers {
		l, err := layerOf(files)
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			t.Fatal(err)
		}
	}
	ref := fmt.Sprintf("127.0.0.1:%d/%s:latest", r.port, updateRepo)
	if err := pushImage(fmt.Sprintf("http://127.0.0.1:%d", r.port), updateRepo, "latest", img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	d, _ := img.Digest()
	t.Logf("registry: %s is %s", ref, d)
	return img
}

var v2Files = []layerFile{
	{path: "etc/berth-e2e-release", mode: 0o644, data: []byte(releaseV2)},
	{path: "etc/issue", mode: 0o644, data: []byte(issueV2)},
	{path: asidePath, mode: 0o644, data: []byte(profileV2)},
	{path: "usr/share/berth-e2e", mode: 0o755, dir: true},
	{path: "usr/share/berth-e2e/v2", mode: 0o644, data: []byte("v2\n")},
}

var v3Files = []layerFile{
	{path: "usr/lib/berth", mode: 0o755, dir: true},
	{path: "usr/lib/berth/health.d", mode: 0o755, dir: true},
	{path: "usr/lib/berth/health.d/50-e2e-fail", mode: 0o755, data: []byte("#!/bin/sh\necho '" + failMessage + "' >&2\nexit 1\n")},
	{path: "etc/berth-e2e-release", mode: 0o644, data: []byte("v3\n")},
}

func v4Files() []layerFile {
	big := make([]byte, bigFileSize)
	rng := rand.New(rand.NewPCG(4, 4))
	for i := 0; i+8 <= len(big); i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8; j++ {
			big[i+j] = byte(v >> (8 * j))
		}
	}
	return []layerFile{
		{path: "etc/berth-e2e-release", mode: 0o644, data: []byte("v4\n")},
		{path: "usr/share/berth-e2e", mode: 0o755, dir: true},
		{path: "usr/share/berth-e2e/big", mode: 0o644, data: big},
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
	g := installGuest(t, "update", harness.Trixie, "--target-imgref", reg.guestRef())
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
printf '[[registry]]\nlocation = "10.0.2.2:%d"\ninsecure = true\n' > /etc/containers/registries.conf.d/50-berth-e2e.conf
sync`, motdLocal, issueLocal, helloBody, asidePath, reg.port))
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

// pushImage uploads img with the registry API (monolithic blob uploads, then the
// manifest). go-containerregistry's remote package would pull docker/cli in for its
// keychain, containers/image's copy ocicrypt; neither is needed for this.
func pushImage(base, repo, tag string, img v1.Image) error {
	put := func(digest v1.Hash, body func() (io.ReadCloser, error)) error {
		resp, err := http.Head(base + "/v2/" + repo + "/blobs/" + digest.String())
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		resp, err = http.Post(base+"/v2/"+repo+"/blobs/uploads/", "", nil)
		if err != nil {
			return err
		}
		resp.Body.Close()
		loc := resp.Header.Get("Location")
		if resp.StatusCode != http.StatusAccepted || loc == "" {
			return fmt.Errorf("start upload of %s: %s", digest, resp.Status)
		}
		if !strings.HasPrefix(loc, "http") {
			loc = base + loc
		}
		sep := "?"
		if strings.Contains(loc, "?") {
			sep = "&"
		}
		rc, err := body()
		if err != nil {
			return err
		}
		defer rc.Close()
		req, err := http.NewRequest(http.MethodPut, loc+sep+"digest="+digest.String(), rc)
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/octet-stream")
		resp, err = http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			return fmt.Errorf("upload %s: %s", digest, resp.Status)
		}
		return nil
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return err
		}
		if err := put(d, l.Compressed); err != nil {
			return err
		}
	}
	cfg, err := img.RawConfigFile()
	if err != nil {
		return err
	}
	cd, err := img.ConfigName()
	if err != nil {
		return err
	}
	if err := put(cd, func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(cfg)), nil }); err != nil {
		return err
	}
	m, err := img.RawManifest()
	if err != nil {
		return err
	}
	mt, err := img.MediaType()
	if err != nil {
		return err
	}
	req, err := http.NewRequest(http.MethodPut, base+"/v2/"+repo+"/manifests/"+tag, bytes.NewReader(m))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", string(mt))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("put manifest: %s", resp.Status)
	}
	return nil
}
