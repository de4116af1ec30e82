package oci

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
)

// These tests show that signatures are not only required but accepted:
// a correctly signed image pulls, with the same result as an unsigned
// pull of the same image, and a signature by another key or for another
// image does not let it in.

// writePolicy writes a containers-policy.json for opts.
func writePolicy(t *testing.T, opts PullOptions, policy any) {
	t.Helper()
	data, err := json.Marshal(policy)
	must(t, err)
	must(t, os.WriteFile(opts.PolicyPath, data, 0o644))
}

// writeRegistriesD writes a registries.d file for reg into the directory
// opts uses (containers-registries.d(5)).
func writeRegistriesD(t *testing.T, opts PullOptions, reg, settings string) {
	t.Helper()
	dir := opts.SystemContext.RegistriesDirPath
	must(t, os.MkdirAll(dir, 0o755))
	conf := fmt.Sprintf("docker:\n  %q:\n%s", reg, settings)
	must(t, os.WriteFile(filepath.Join(dir, "test.yaml"), []byte(conf), 0o644))
}

// unsignedDigest pulls the image from an OCI layout without any policy
// and returns its composefs digest: what a signed pull must produce too.
func unsignedDigest(t *testing.T, b *builtImage) string {
	t.Helper()
	layout := filepath.Join(t.TempDir(), "layout")
	b.writeOCILayout(t, layout, "v1")
	img, err := Pull(context.Background(), "oci:"+layout+":v1", testPullOptions(t, t.TempDir()))
	must(t, err)
	return img.ComposefsDigest
}

func mustRejectSig(t *testing.T, err error, what string, wants ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: pulled, want a rejection by the signature policy", what)
	}
	if !strings.Contains(err.Error(), "rejected by the signature policy") {
		t.Fatalf("%s: error %q does not say the policy rejected it", what, err)
	}
	t.Logf("%s: %v", what, err)
	for _, w := range wants {
		if !strings.Contains(err.Error(), w) {
			t.Fatalf("%s: error %q does not mention %q", what, err, w)
		}
	}
}

// sigstoreKey is an ECDSA P-256 key, the kind cosign and
// `skopeo generate-sigstore-key` make.
type sigstoreKey struct {
	priv   *ecdsa.PrivateKey
	pubPEM string // path of the PEM public key (what keyPath names)
}

func newSigstoreKey(t *testing.T) *sigstoreKey {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(t, err)
	der, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	must(t, err)
	p := filepath.Join(t.TempDir(), "cosign.pub")
	must(t, os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644))
	return &sigstoreKey{priv: priv, pubPEM: p}
}

// attach signs the claim "manifestDigest is dockerRef" and pushes it as
// a sigstore attachment, as cosign does: an OCI manifest tagged
// sha256-<hex>.sig whose layer is the payload, with the base64 ECDSA
// signature of the payload in an annotation.
// The attachment belongs to attachTo; the claim names manifestDigest.
func (k *sigstoreKey) attach(t *testing.T, reg, repo, attachTo, manifestDigest, dockerRef string) {
	t.Helper()
	payload, err := json.Marshal(map[string]any{
		"critical": map[string]any{
			"type":     "cosign container image signature",
			"image":    map[string]string{"docker-manifest-digest": manifestDigest},
			"identity": map[string]string{"docker-reference": dockerRef},
		},
		"optional": nil,
	})
	must(t, err)
	h := sha256.Sum256(payload)
	sig, err := ecdsa.SignASN1(rand.Reader, k.priv, h[:])
	must(t, err)
	cfg := []byte(`{"architecture":"","os":"","config":{},"rootfs":{"type":"layers","diff_ids":["` + sha(payload) + `"]}}`)
	man, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(cfg), "size": len(cfg)},
		"layers": []any{map[string]any{
			"mediaType":   "application/vnd.dev.cosign.simplesigning.v1+json",
			"digest":      sha(payload),
			"size":        len(payload),
			"annotations": map[string]string{"dev.cosignproject.cosign/signature": base64.StdEncoding.EncodeToString(sig)},
		}},
	})
	must(t, err)
	att := &builtImage{manifest: man, blobs: map[string][]byte{sha(cfg): cfg, sha(payload): payload}}
	pushToRegistry(t, att, reg, repo, strings.Replace(attachTo, ":", "-", 1)+".sig")
}

func TestSigstoreSignedPull(t *testing.T) {
	ctx := context.Background()
	reg := startRegistry(t)
	b := (&testImage{layers: standardLayers(t)}).build(t)
	want := unsignedDigest(t, b)
	md := sha(b.manifest)
	key, other := newSigstoreKey(t), newSigstoreKey(t)

	signedName := reg + "/signed/os:v1"
	pushToRegistry(t, b, reg, "signed/os", "v1")
	key.attach(t, reg, "signed/os", md, md, signedName)
	unsignedName := reg + "/unsigned/os:v1"
	pushToRegistry(t, b, reg, "unsigned/os", "v1")
	// Signed, but for another image: its claim names another digest.
	wrongName := reg + "/wrong/os:v1"
	pushToRegistry(t, b, reg, "wrong/os", "v1")
	key.attach(t, reg, "wrong/os", md, "sha256:"+strings.Repeat("0f", 32), wrongName)

	policy := map[string]any{"default": []any{map[string]any{"type": "reject"}}}
	pull := func(name, pub string, attachments bool) (*Image, error) {
		opts := testPullOptions(t, t.TempDir())
		if attachments {
			writeRegistriesD(t, opts, reg, "    use-sigstore-attachments: true\n")
		}
		policy["transports"] = map[string]any{"docker": map[string]any{
			reg: []any{map[string]any{"type": "sigstoreSigned", "keyPath": pub, "signedIdentity": map[string]any{"type": "matchRepoDigestOrExact"}}},
		}}
		writePolicy(t, opts, policy)
		return Pull(ctx, name, opts)
	}

	img, err := pull(signedName, key.pubPEM, true)
	if err != nil {
		t.Fatalf("signed image with the right key: %v", err)
	}
	if img.ComposefsDigest != want {
		t.Errorf("signed pull gives composefs digest %s, the unsigned pull %s", img.ComposefsDigest, want)
	}
	_, err = pull(signedName, other.pubPEM, true)
	mustRejectSig(t, err, "signed by another key", "verification failed")
	_, err = pull(unsignedName, key.pubPEM, true)
	mustRejectSig(t, err, "unsigned image", "no signature exists")
	_, err = pull(wrongName, key.pubPEM, true)
	mustRejectSig(t, err, "signature for another digest", "0f0f0f")
	// Without use-sigstore-attachments the signature is not looked for, so
	// the same image is rejected: acceptance above came from it.
	_, err = pull(signedName, key.pubPEM, false)
	mustRejectSig(t, err, "signed image, attachments not configured", "no signature exists")
}

// gpgKey is an OpenPGP key made for one test.
type gpgKey struct {
	entity  *openpgp.Entity
	pubring string // path of the public key (what keyPath names)
}

func newGPGKey(t *testing.T, name string) *gpgKey {
	t.Helper()
	e, err := openpgp.NewEntity(name, "berth test", name+"@example.org", nil)
	must(t, err)
	var pub bytes.Buffer
	must(t, e.Serialize(&pub))
	p := filepath.Join(t.TempDir(), name+".gpg")
	must(t, os.WriteFile(p, pub.Bytes(), 0o644))
	return &gpgKey{entity: e, pubring: p}
}

// sign makes a simple-signing signature (containers-signature(5)): an
// OpenPGP signed message whose literal data is the JSON claim that the
// manifest with this digest is dockerRef.
func (k *gpgKey) sign(t *testing.T, manifestDigest, dockerRef string) []byte {
	t.Helper()
	claim, err := json.Marshal(map[string]any{
		"critical": map[string]any{
			"type":     "atomic container signature",
			"image":    map[string]string{"docker-manifest-digest": manifestDigest},
			"identity": map[string]string{"docker-reference": dockerRef},
		},
		"optional": map[string]any{"creator": "berth test", "timestamp": time.Now().Unix()},
	})
	must(t, err)
	var out bytes.Buffer
	w, err := openpgp.Sign(&out, k.entity, nil, nil)
	must(t, err)
	_, err = w.Write(claim)
	must(t, err)
	must(t, w.Close())
	return out.Bytes()
}

func TestSimpleSigningSignedPull(t *testing.T) {
	ctx := context.Background()
	reg := startRegistry(t)
	b := (&testImage{layers: standardLayers(t)}).build(t)
	want := unsignedDigest(t, b)
	pushToRegistry(t, b, reg, "gpg/os", "v1")
	name := reg + "/gpg/os:v1"
	md := sha(b.manifest)

	key := newGPGKey(t, "release")
	stranger := newGPGKey(t, "stranger")

	// The lookaside ("sigstore" in older docs) layout of
	// containers-registries.d(5): <base>/<repo>@sha256=<hex>/signature-N.
	lookaside := t.TempDir()
	sigFile := filepath.Join(lookaside, "gpg", "os@sha256="+strings.TrimPrefix(md, "sha256:"), "signature-1")
	must(t, os.MkdirAll(filepath.Dir(sigFile), 0o755))

	pull := func(sig []byte, keyPath string) (*Image, error) {
		opts := testPullOptions(t, t.TempDir())
		writeRegistriesD(t, opts, reg, "    lookaside: file://"+lookaside+"\n")
		writePolicy(t, opts, map[string]any{"default": []any{
			map[string]any{"type": "signedBy", "keyType": "GPGKeys", "keyPath": keyPath},
		}})
		if sig == nil {
			os.Remove(sigFile)
		} else {
			must(t, os.WriteFile(sigFile, sig, 0o644))
		}
		return Pull(ctx, name, opts)
	}

	img, err := pull(key.sign(t, md, name), key.pubring)
	if err != nil {
		t.Fatalf("image signed by the trusted key: %v", err)
	}
	if img.ComposefsDigest != want {
		t.Errorf("signed pull gives composefs digest %s, the unsigned pull %s", img.ComposefsDigest, want)
	}

	_, err = pull(key.sign(t, md, reg+"/gpg/other:v1"), key.pubring)
	mustRejectSig(t, err, "signature for another reference", "other:v1")
	otherDigest := "sha256:" + strings.Repeat("0f", 32)
	_, err = pull(key.sign(t, otherDigest, name), key.pubring)
	mustRejectSig(t, err, "signature for another manifest digest", otherDigest)
	_, err = pull(stranger.sign(t, md, name), key.pubring)
	mustRejectSig(t, err, "signature by an untrusted key", "Key not found")
	_, err = pull(nil, key.pubring)
	mustRejectSig(t, err, "no signature", "no signature exists")
	bad := key.sign(t, md, name)
	bad[len(bad)-20] ^= 0xff
	_, err = pull(bad, key.pubring)
	mustRejectSig(t, err, "corrupted signature", "invalid signature")
}
