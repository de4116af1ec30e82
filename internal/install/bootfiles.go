package install

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/uki"
)

// Boot files carried forward: systemd-stub (built into every UKI) and systemd-boot (on the
// ESP) are taken from the image, else from the machine berth runs on. An image without
// them (a bootc-style image: kernel and userland only) deployed on a system that is itself
// such an image has neither, so berth keeps what it used before: a copy of the last stub in
// its store (keptStubPath) and the systemd-boot already on the ESP.

// hostRoot is the machine berth runs on (a variable so tests can stand in for it).
var hostRoot fs.FS = os.DirFS("/")

// keptStubPath is where the stub of the last deployment is kept, below the store's boot
// directory (with the cached initramfs images: boot inputs that are not deployments).
func keptStubPath(l store.Layout) string {
	return filepath.Join(l.Boot(), "linux"+uki.EFIArch()+".efi.stub")
}

// pickStub is findStubCarried, then keeps what it took (crash-safely) for the next
// deployment.
func pickStub(l store.Layout, image, host fs.FS) (stub []byte, from string, err error) {
	if stub, from, err = findStubCarried(l, image, host); err != nil {
		return nil, "", err
	}
	if err := keepStub(keptStubPath(l), stub); err != nil {
		return nil, "", err
	}
	return stub, from, nil
}

// findStubCarried takes systemd-stub from the image, else from host, else the copy kept
// in the store. It only reads. from says where the stub came from ("image:/…",
// "host:/…", "kept:…").
func findStubCarried(l store.Layout, image, host fs.FS) (stub []byte, from string, err error) {
	b, p, err := uki.FindStub(image)
	if err == nil {
		return b, "image:/" + p, nil
	}
	if !errors.Is(err, uki.ErrNoStub) {
		return nil, "", fmt.Errorf("image: %w", err)
	}
	if hb, hp, herr := uki.FindStub(host); herr == nil {
		return hb, "host:/" + hp, nil
	}
	kept := keptStubPath(l)
	kb, kerr := readKeptStub(kept)
	if kerr != nil {
		return nil, "", fmt.Errorf("neither the image nor this machine has systemd-stub, and berth kept none from an earlier deployment (%s: %v): %w", kept, kerr, err)
	}
	return kb, "kept:" + kept, nil
}

// readKeptStub reads and checks the kept stub (it is berth's own file, but a damaged copy
// must not end up in a UKI).
func readKeptStub(path string) ([]byte, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() || fi.Size() > 16<<20 {
		return nil, fmt.Errorf("not a regular file of at most 16 MiB")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if err := uki.CheckPE(b); err != nil {
		return nil, fmt.Errorf("kept systemd-stub %s: %w", path, err)
	}
	return b, nil
}

// keepStub stores stub at path unless the same bytes are there already.
func keepStub(path string, stub []byte) error {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, stub) {
		return nil
	}
	if err := fsutil.MkdirAllSync(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("keep systemd-stub: %w", err)
	}
	if err := fsutil.WriteFileAtomic(path, stub, 0o644); err != nil {
		return fmt.Errorf("keep systemd-stub: %w", err)
	}
	return nil
}

// installBootLoader installs systemd-boot from the image, else from host; when neither
// has it, the systemd-boot already on the ESP (put there by an earlier install) stays.
// It fails only when there is none anywhere. from says which was used.
func installBootLoader(esp boot.ESP, image, host fs.FS) (from string, err error) {
	ierr := esp.InstallSystemdBoot(image)
	if ierr == nil {
		return "image", nil
	}
	if !errors.Is(ierr, boot.ErrNoSystemdBoot) {
		return "", fmt.Errorf("image: %w", ierr)
	}
	if herr := esp.InstallSystemdBoot(host); herr == nil {
		return "host", nil
	}
	onESP := filepath.Join(esp.Dir, "EFI", "systemd", "systemd-boot"+uki.EFIArch()+".efi")
	b, err := os.ReadFile(onESP)
	if err != nil {
		return "", fmt.Errorf("%w; and there is no systemd-boot on the ESP to keep (%v)", ierr, err)
	}
	if err := uki.CheckPE(b); err != nil {
		return "", fmt.Errorf("%w; and the systemd-boot on the ESP (%s) is damaged: %v", ierr, onESP, err)
	}
	for _, d := range []string{boot.LinuxDir, boot.EntriesDir} {
		if err := fsutil.MkdirAllSync(filepath.Join(esp.Dir, filepath.FromSlash(d)), 0o755); err != nil {
			return "", fmt.Errorf("install systemd-boot: %w", err)
		}
	}
	return "kept on the ESP", nil
}
