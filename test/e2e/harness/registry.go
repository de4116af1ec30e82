package harness

// An OCI registry on the host's 127.0.0.1 and the small layers pushed to it: the update
// images of the VM update lane (test/e2e/update_test.go) and of `make demo` are the guest's
// oci-archive plus one such layer each. The guest reaches the registry as 10.0.2.2 through
// qemu's user network. One copy here, because berth-demo is a binary and cannot import the
// lane's _test code.

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	ggtypes "github.com/google/go-containerregistry/pkg/v1/types"
)

// GuestHostAddr is the host as the guest sees it on qemu's user network.
const GuestHostAddr = "10.0.2.2"

// LayerFile is one entry of a layer made by LayerOf: a regular file with Data, or a
// directory (Dir).
type LayerFile struct {
	Path string // relative, no leading slash
	Mode int64
	Data []byte
	Dir  bool
}

// LayerOf makes an OCI layer (tar+gzip) holding files, in order, with a fixed mtime so
// that the same files make the same layer digest.
func LayerOf(files []LayerFile) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	for _, f := range files {
		h := &tar.Header{Name: f.Path, Mode: f.Mode, ModTime: mtime, Format: tar.FormatPAX}
		if f.Dir {
			h.Typeflag, h.Name = tar.TypeDir, f.Path+"/"
		} else {
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("layer entry %s: %w", f.Path, err)
		}
		if _, err := tw.Write(f.Data); err != nil {
			return nil, fmt.Errorf("layer entry %s: %w", f.Path, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil },
		tarball.WithMediaType(ggtypes.OCILayer), tarball.WithCompressionLevel(1))
}

// AppendLayers returns base with one layer per file list on top.
func AppendLayers(base v1.Image, layers ...[]LayerFile) (v1.Image, error) {
	img := base
	for _, files := range layers {
		l, err := LayerOf(files)
		if err != nil {
			return nil, err
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			return nil, err
		}
	}
	return img, nil
}

// ArchiveImage opens the first image of an oci-archive (as mkguest writes them), unpacked
// into dir as an OCI layout.
func ArchiveImage(archive, dir string) (v1.Image, error) {
	if err := untarLayout(archive, dir); err != nil {
		return nil, fmt.Errorf("unpack %s: %w", archive, err)
	}
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", archive, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", archive, err)
	}
	if len(im.Manifests) == 0 {
		return nil, fmt.Errorf("%s: no image in its index", archive)
	}
	img, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", archive, err)
	}
	return img, nil
}

// untarLayout unpacks an OCI layout archive: directories and regular files only, each
// kept under dir (the names are cleaned as if rooted), anything else is refused.
func untarLayout(archive, dir string) error {
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
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			out, err := os.Create(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(out, tr)
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		default:
			return fmt.Errorf("%s: entry type %q is not part of an OCI layout", h.Name, h.Typeflag)
		}
	}
}

// Registry is an in-process OCI registry (go-containerregistry's) serving one
// repository's :latest on 127.0.0.1 over plain HTTP.
type Registry struct {
	Port int
	Repo string // e.g. "berth/e2e"
	srv  *http.Server
}

// ServeRegistry starts a registry on a free port of 127.0.0.1; Close stops it.
func ServeRegistry(repo string) (*Registry, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	srv := &http.Server{Handler: registry.New(registry.Logger(log.New(io.Discard, "", 0)))}
	go srv.Serve(ln)
	return &Registry{Port: ln.Addr().(*net.TCPAddr).Port, Repo: repo, srv: srv}, nil
}

// Close stops the registry.
func (r *Registry) Close() error { return r.srv.Close() }

// HostRef is the registry's :latest as this process names it.
func (r *Registry) HostRef() string {
	return fmt.Sprintf("docker://127.0.0.1:%d/%s:latest", r.Port, r.Repo)
}

// GuestRef is the registry's :latest as the guest names it (berth install --target-imgref).
func (r *Registry) GuestRef() string {
	return fmt.Sprintf("docker://%s:%d/%s:latest", GuestHostAddr, r.Port, r.Repo)
}

// GuestRegistriesConf is a registries.conf.d drop-in (for
// /etc/containers/registries.conf.d/ in the guest) that lets berth pull from the
// registry over plain HTTP.
func (r *Registry) GuestRegistriesConf() string {
	return fmt.Sprintf("[[registry]]\nlocation = \"%s:%d\"\ninsecure = true\n", GuestHostAddr, r.Port)
}

// Push makes base plus one layer per file list the registry's :latest and returns that image.
func (r *Registry) Push(base v1.Image, layers ...[]LayerFile) (v1.Image, error) {
	img, err := AppendLayers(base, layers...)
	if err != nil {
		return nil, err
	}
	if err := PushImage(fmt.Sprintf("http://127.0.0.1:%d", r.Port), r.Repo, "latest", img); err != nil {
		return nil, fmt.Errorf("push %s: %w", r.HostRef(), err)
	}
	return img, nil
}

// PushImage uploads img as repo:tag with the registry API at base (http://host:port):
// monolithic blob uploads, then the manifest. go-containerregistry's remote package would
// pull docker/cli in for its keychain, containers/image's copy ocicrypt; neither is needed
// for this.
func PushImage(base, repo, tag string, img v1.Image) error {
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
	if mt == "" {
		return errors.New("image has no manifest media type")
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
