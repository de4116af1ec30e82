package install

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

// bootFilesFS is a tree with systemd-stub and systemd-boot at Debian's paths.
func bootFilesFS(stub, sdboot []byte) fstest.MapFS {
	m := fstest.MapFS{}
	if stub != nil {
		m["usr/lib/systemd/boot/efi/linuxx64.efi.stub"] = &fstest.MapFile{Data: stub, Mode: 0o644}
	}
	if sdboot != nil {
		m["usr/lib/systemd/boot/efi/systemd-bootx64.efi"] = &fstest.MapFile{Data: sdboot, Mode: 0o644}
	}
	return m
}

// useStub is what an install or deployment does with the stub: the preflight finds it,
// deployImage keeps it.
func useStub(l store.Layout, image, host fstest.MapFS) ([]byte, string, error) {
	stub, from, err := findStubCarried(l, image, host)
	if err != nil {
		return nil, "", err
	}
	return stub, from, keepStub(keptStubPath(l), stub)
}

// TestBootFilesCarriedForwardWhenImageAndHostHaveNone: an image without systemd-stub and
// systemd-boot deploys on a machine without them (a bootc-style system upgrading itself)
// with the stub berth kept from the previous deployment and the systemd-boot already on
// the ESP; with nothing kept it fails and says so.
func TestBootFilesCarriedForwardWhenImageAndHostHaveNone(t *testing.T) {
	testenv.RequireFile(t, hostStub, "systemd-boot-efi")
	testenv.RequireFile(t, hostBoot, "systemd-boot-efi")
	stub, err := os.ReadFile(hostStub)
	if err != nil {
		t.Fatal(err)
	}
	sdboot, err := os.ReadFile(hostBoot)
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	l := store.At(filepath.Join(tmp, "sysroot"))
	if err := l.Init(); err != nil {
		t.Fatal(err)
	}
	esp := boot.ESP{Dir: filepath.Join(tmp, "esp")}
	os.Mkdir(esp.Dir, 0o755)
	none := fstest.MapFS{}
	host := bootFilesFS(stub, sdboot)

	// Install: the image has neither, the installing host has both.
	got, from, err := useStub(l, none, host)
	if err != nil || !bytes.Equal(got, stub) || !strings.HasPrefix(from, "host:/") {
		t.Fatalf("install: stub from %q, %v", from, err)
	}
	if kept, err := os.ReadFile(keptStubPath(l)); err != nil || !bytes.Equal(kept, stub) {
		t.Fatalf("the stub used at install is not kept in the store: %v", err)
	}
	if from, err := installBootLoader(esp, none, host); err != nil || !strings.HasPrefix(from, "host:/") {
		t.Fatalf("install: systemd-boot from %q, %v", from, err)
	}
	onESP := filepath.Join(esp.Dir, "EFI/systemd/systemd-bootx64.efi")
	if b, err := os.ReadFile(onESP); err != nil || !bytes.Equal(b, sdboot) {
		t.Fatalf("systemd-boot not on the ESP after install: %v", err)
	}

	// Upgrade on the installed system: image and host (the running image) have neither.
	got, from, err = useStub(l, none, none)
	if err != nil || !bytes.Equal(got, stub) || from != "kept:"+keptStubPath(l) {
		t.Fatalf("upgrade: stub from %q, %v; want the kept one", from, err)
	}
	if from, err := installBootLoader(esp, none, none); err != nil || from != "kept on the ESP" {
		t.Fatalf("upgrade: systemd-boot %q, %v; want the one on the ESP kept", from, err)
	}
	if b, err := os.ReadFile(onESP); err != nil || !bytes.Equal(b, sdboot) {
		t.Fatalf("systemd-boot on the ESP changed or vanished: %v", err)
	}

	// An image that brings its own stub wins, and becomes the kept one.
	newer := append(append([]byte(nil), stub...), make([]byte, 512)...)
	got, from, err = useStub(l, bootFilesFS(newer, nil), host)
	if err != nil || !bytes.Equal(got, newer) || !strings.HasPrefix(from, "image:/") {
		t.Fatalf("image stub: from %q, %v", from, err)
	}
	if kept, _ := os.ReadFile(keptStubPath(l)); !bytes.Equal(kept, newer) {
		t.Error("the kept stub is not the one used last")
	}

	// A damaged kept copy is not built into a UKI.
	if err := os.WriteFile(keptStubPath(l), []byte("not a PE image"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := useStub(l, none, none); err == nil {
		t.Error("a damaged kept stub was used")
	}

	// Nothing anywhere: clear errors.
	l2 := store.At(filepath.Join(tmp, "other"))
	l2.Init()
	if _, _, err := useStub(l2, none, none); err == nil || !strings.Contains(err.Error(), "systemd-boot-efi") || !strings.Contains(err.Error(), "kept none") {
		t.Errorf("no stub anywhere: %v", err)
	}
	esp2 := boot.ESP{Dir: filepath.Join(tmp, "esp2")}
	os.Mkdir(esp2.Dir, 0o755)
	if _, err := installBootLoader(esp2, none, none); err == nil || !strings.Contains(err.Error(), "none on the ESP") {
		t.Errorf("no systemd-boot anywhere: %v", err)
	}
}
