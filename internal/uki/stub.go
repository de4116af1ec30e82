package uki

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"

	"github.com/berth-dev/berth/internal/fsutil"
)

// EFIArch maps GOARCH to the EFI architecture suffix systemd uses in file
// names (linuxx64.efi.stub, systemd-bootaa64.efi, ...).
func EFIArch() string {
	switch runtime.GOARCH {
	case "amd64":
		return "x64"
	case "386":
		return "ia32"
	case "arm64":
		return "aa64"
	case "riscv64":
		return "riscv64"
	case "loong64":
		return "loongarch64"
	}
	return runtime.GOARCH
}

// StubDirs are the directories (relative to a root) where distributions
// install systemd's EFI binaries.
var StubDirs = []string{"usr/lib/systemd/boot/efi", "lib/systemd/boot/efi"}

// ErrNoStub is wrapped when no systemd-stub is found.
var ErrNoStub = errors.New("no systemd-stub found (install it in the image or on the host: Debian/Ubuntu package systemd-boot-efi, Fedora systemd-boot-unsigned (or systemd-ukify), Arch systemd)")

const maxStubSize = 16 << 20

// FindStub looks for systemd-stub (linux<arch>.efi.stub) below root, e.g. an
// image tree or os.DirFS("/") for the host, and returns its bytes and its
// path inside root. Only a regular file of sane size that parses as a PE
// image is accepted.
func FindStub(root fs.FS) ([]byte, string, error) {
	for _, dir := range StubDirs {
		name := dir + "/linux" + EFIArch() + ".efi.stub"
		b, err := fsutil.ReadFileFS(root, name, maxStubSize)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, "", fmt.Errorf("systemd-stub %s: %w", name, err)
		}
		if _, err := parsePE(b); err != nil {
			return nil, "", fmt.Errorf("systemd-stub %s: %w", name, err)
		}
		return b, name, nil
	}
	return nil, "", ErrNoStub
}

// LoadSigner reads a PEM private key (PKCS#1 or PKCS#8, RSA) and a PEM
// certificate for signing UKIs.
func LoadSigner(keyPath, certPath string) (crypto.Signer, *x509.Certificate, error) {
	kb, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, nil, fmt.Errorf("read signing key: %w", err)
	}
	cb, err := os.ReadFile(certPath)
	if err != nil {
		return nil, nil, fmt.Errorf("read signing certificate: %w", err)
	}
	key, err := parsePrivateKey(kb)
	if err != nil {
		return nil, nil, fmt.Errorf("signing key %s: %w", keyPath, err)
	}
	cblk, _ := pem.Decode(cb)
	if cblk == nil || cblk.Type != "CERTIFICATE" {
		return nil, nil, fmt.Errorf("signing certificate %s: no PEM CERTIFICATE block", certPath)
	}
	cert, err := x509.ParseCertificate(cblk.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("signing certificate %s: %w", certPath, err)
	}
	return key, cert, nil
}

// LoadPrivateKey reads a PEM private key (PKCS#1 or PKCS#8), e.g. the PCR
// signing key for Options.PCRSignKey.
func LoadPrivateKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read private key: %w", err)
	}
	k, err := parsePrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("private key %s: %w", path, err)
	}
	return k, nil
}

func parsePrivateKey(b []byte) (crypto.Signer, error) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("no PEM block")
	}
	if k, err := x509.ParsePKCS1PrivateKey(blk.Bytes); err == nil {
		return k, nil
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, errors.New("not a PKCS#1 or PKCS#8 private key")
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("unsupported key type %T", k)
	}
	return s, nil
}
