package generator

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
)

const good = "root=PARTUUID=0e2e0002-0000-0000-0000-000000000002 rw berth.composefs=3fa2c41b09de5f0e6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b berth.deploy=7-3fa2c41b09de"

func TestRun(t *testing.T) {
	unitDir := t.TempDir()
	tests := []struct {
		name      string
		cmdline   string
		initrd    bool
		installed bool
		wantWired bool
		wantUnit  bool // the unit file itself written to the output dir
		wantInMsg string
	}{
		{name: "stock boot in initrd", cmdline: "root=UUID=1 ro quiet", initrd: true, wantInMsg: "nothing to do"},
		{name: "berth in initrd, unit not installed", cmdline: good, initrd: true, wantWired: true, wantUnit: true},
		{name: "berth in initrd, unit installed", cmdline: good, initrd: true, installed: true, wantWired: true},
		{name: "malformed berth args still wire the refusal", cmdline: "berth.composefs=xyz", initrd: true, wantWired: true, wantUnit: true, wantInMsg: "will stop the boot"},
		{name: "berth in the running system", cmdline: good, initrd: false, wantInMsg: "nothing to generate"},
		{name: "only after --", cmdline: "root=/dev/vda -- berth.composefs=x", initrd: true, wantInMsg: "nothing to do"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := t.TempDir()
			dirs := []string{t.TempDir()}
			if tt.installed {
				dirs = []string{unitDir}
				os.WriteFile(filepath.Join(unitDir, Unit), []byte(UnitText), 0o644)
			}
			res, err := Run(Options{Cmdline: tt.cmdline, InInitrd: tt.initrd, NormalDir: out, UnitDirs: dirs})
			if err != nil {
				t.Fatal(err)
			}
			if res.Wired != tt.wantWired || !strings.Contains(res.Message, tt.wantInMsg) {
				t.Fatalf("Run = %+v", res)
			}
			link := filepath.Join(out, "initrd-root-fs.target.requires", Unit)
			target, lerr := os.Readlink(link)
			if tt.wantWired != (lerr == nil) {
				t.Fatalf("requires link: %v", lerr)
			}
			_, uerr := os.Stat(filepath.Join(out, Unit))
			if tt.wantUnit != (uerr == nil) {
				t.Fatalf("unit file in output dir: %v", uerr)
			}
			if tt.wantWired {
				want := "../" + Unit
				if tt.installed {
					want = filepath.Join(unitDir, Unit)
				}
				if target != want {
					t.Fatalf("link target %q, want %q", target, want)
				}
			}
			if !tt.wantWired {
				ents, _ := os.ReadDir(out)
				if len(ents) != 0 {
					t.Fatalf("wrote %d entries with nothing to do", len(ents))
				}
			}
		})
	}
}

// TestUnitTextMatchesFile keeps the embedded copy equal to units/.
func TestUnitTextMatchesFile(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	b, err := os.ReadFile(filepath.Join(filepath.Dir(file), "../../../units", Unit))
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != UnitText {
		t.Fatal("units/berth-setup-root.service and generator.UnitText differ")
	}
}

// TestBinary runs the real generator binary with a fake /proc/cmdline.
func TestBinary(t *testing.T) {
	testenv.RequireTool(t, "go", "golang (or /usr/local/go/bin in PATH)")
	bin := filepath.Join(t.TempDir(), "berth-generator")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/berth-dev/berth/generators/berth-generator").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	cl := filepath.Join(t.TempDir(), "cmdline")
	os.WriteFile(cl, []byte(good+"\n"), 0o644)
	for _, initrd := range []string{"1", "0"} {
		out := t.TempDir()
		c := exec.Command(bin, "--cmdline", cl, out, out, out)
		c.Env = append(os.Environ(), "SYSTEMD_IN_INITRD="+initrd)
		if o, err := c.CombinedOutput(); err != nil {
			t.Fatalf("generator: %v\n%s", err, o)
		}
		_, err := os.Lstat(filepath.Join(out, "initrd-root-fs.target.requires", Unit))
		if (initrd == "1") != (err == nil) {
			t.Fatalf("SYSTEMD_IN_INITRD=%s: link %v", initrd, err)
		}
	}
	// Nothing to do: exit 0, nothing written.
	out := t.TempDir()
	c := exec.Command(bin, out, out, out)
	c.Env = append(os.Environ(), "SYSTEMD_IN_INITRD=1", "SYSTEMD_PROC_CMDLINE=root=/dev/vda ro")
	if o, err := c.CombinedOutput(); err != nil {
		t.Fatalf("generator: %v\n%s", err, o)
	}
	if ents, _ := os.ReadDir(out); len(ents) != 0 {
		t.Fatal("generator wrote files without berth arguments")
	}
}

// TestSystemdAnalyzeVerify checks the unit files in units/ with
// systemd-analyze verify (host systemd, else the trixie rootfs's in a chroot).
func TestSystemdAnalyzeVerify(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	all, _ := filepath.Glob(filepath.Join(filepath.Dir(file), "../../../units", "*"))
	var units []string
	for _, u := range all {
		switch filepath.Ext(u) {
		case ".service", ".timer", ".target", ".mount", ".socket", ".path":
			units = append(units, u)
		}
	}
	if len(units) == 0 {
		t.Fatal("no units found")
	}
	sa := testenv.RequireTool(t, "systemd-analyze", "systemd")
	// systemd-analyze verify needs the binaries units run to exist: give
	// berth's (not installed here) stand-ins, and the units a private path.
	dir := t.TempDir()
	berthBin := regexp.MustCompile(`/usr/lib/berth/([A-Za-z0-9_.-]+)`)
	for _, u := range units {
		b, _ := os.ReadFile(u)
		text := berthBin.ReplaceAllStringFunc(string(b), func(m string) string {
			fake := filepath.Join(dir, "bin-"+filepath.Base(m))
			os.WriteFile(fake, []byte("#!/bin/sh\n"), 0o755)
			return fake
		})
		os.WriteFile(filepath.Join(dir, filepath.Base(u)), []byte(text), 0o644)
	}
	var args []string
	for _, u := range units {
		args = append(args, filepath.Join(dir, filepath.Base(u)))
	}
	// In an initrd, systemd-fstab-generator makes sysroot.mount from root=;
	// this stand-in lets verify resolve the dependency outside one.
	os.WriteFile(filepath.Join(dir, "sysroot.mount"), []byte("[Mount]\nWhat=/dev/disk/by-label/root\nWhere=/sysroot\n"), 0o644)
	c := exec.Command(sa, append([]string{"verify", "--man=no"}, args...)...)
	c.Env = append(os.Environ(), "SYSTEMD_UNIT_PATH="+dir+":")
	out, err := c.CombinedOutput()
	if err != nil || strings.Contains(string(out), dir) {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	t.Logf("systemd-analyze verify %d unit(s): ok %s", len(args), out)
}
