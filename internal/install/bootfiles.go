package install

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/uki"
)

// Boot files carried forward: systemd-stub (built into every UKI) and systemd-boot (on the
// ESP) are taken from the image, else from the machine berth runs on. An image without
// them (a bootc-style image: kernel and userland only) deployed on a system that is itself
// such an image has neither, so berth keeps what it used before: a copy of the last stub in
// its store (keptStubPath) and the systemd-boot already on the ESP. The preflight
// (checkImage) finds both with findStubCarried and findBootLoader, which only read;
// deployImage keeps the stub (keepStub) and installs systemd-boot (installBootLoader).

// keptStubPath is where the stub of the last deployment is kept, below the store's boot
// directory (with the cached initramfs images: boot inputs that are not deployments).
func keptStubPath(l store.Layout) string {
	return filepath.Join(l.Boot(), "linux"+uki.EFIArch()+".efi.stub")
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
	b, err := readPE(path)
	if err != nil {
		return nil, fmt.Errorf("kept systemd-stub %s: %w", path, err)
	}
	return b, nil
}

// readPE reads a regular file of at most 16 MiB that parses as a PE image.
func readPE(path string) ([]byte, error) {
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
		return nil, err
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

// keptOnESP is findBootLoader's "from" for the systemd-boot already on the ESP.
const keptOnESP = "kept on the ESP"

// findBootLoader takes systemd-boot from the image, else from host, else the one already
// on the ESP at espDir (put there by an earlier install; "" = a new ESP, no fallback). It
// only reads. from says which: "image:/…", "host:/…" or keptOnESP.
func findBootLoader(espDir string, image, host fs.FS) (bin []byte, from string, err error) {
	b, p, err := boot.FindSystemdBoot(image)
	if err == nil {
		return b, "image:/" + p, nil
	}
	// An unusable copy in the image falls back to this machine's, as an absent one does.
	if hb, hp, herr := boot.FindSystemdBoot(host); herr == nil {
		return hb, "host:/" + hp, nil
	}
	if !errors.Is(err, boot.ErrNoSystemdBoot) {
		return nil, "", fmt.Errorf("systemd-boot of the image: %w (and this machine has none)", err)
	}
	if espDir == "" {
		return nil, "", fmt.Errorf("neither the image nor this machine has systemd-boot: %w", err)
	}
	onESP := filepath.Join(espDir, "EFI", "systemd", "systemd-boot"+uki.EFIArch()+".efi")
	eb, eerr := readPE(onESP)
	if eerr != nil {
		return nil, "", fmt.Errorf("neither the image nor this machine has systemd-boot, and there is none on the ESP to keep (%s: %v): %w", onESP, eerr, err)
	}
	return eb, keptOnESP, nil
}

// installBootLoader installs systemd-boot on the ESP from where findBootLoader finds it;
// the one already on the ESP stays as it is. It returns where it came from.
func installBootLoader(esp boot.ESP, image, host fs.FS) (from string, err error) {
	_, from, err = findBootLoader(esp.Dir, image, host)
	switch {
	case err != nil:
		return "", err
	case from == keptOnESP:
		for _, d := range []string{boot.LinuxDir, boot.EntriesDir} {
			if err := fsutil.MkdirAllSync(filepath.Join(esp.Dir, filepath.FromSlash(d)), 0o755); err != nil {
				return "", fmt.Errorf("install systemd-boot: %w", err)
			}
		}
		return from, nil
	case strings.HasPrefix(from, "image:"):
		return from, esp.InstallSystemdBoot(image)
	default:
		return from, esp.InstallSystemdBoot(host)
	}
}
