package api

import (
	"context"
	"fmt"

	"github.com/berth-dev/berth/internal/oci"
	"go.podman.io/image/v5/manifest"
	"go.podman.io/image/v5/types"
)

// remoteManifestDigest returns the digest of the manifest ref names for
// this platform (the instance of a manifest list), without fetching any
// layer: enough to tell whether an upgrade has something new. Nothing is
// trusted or stored here; a real pull verifies everything again.
func remoteManifestDigest(ctx context.Context, ref string, insecureTLS bool) (string, error) {
	iref, err := oci.ParseReference(ref, "docker://")
	if err != nil {
		return "", err
	}
	sys := &types.SystemContext{}
	if insecureTLS {
		sys.DockerInsecureSkipTLSVerify = types.OptionalBoolTrue
		sys.OCIInsecureSkipTLSVerify = true
	}
	src, err := iref.NewImageSource(ctx, sys)
	if err != nil {
		return "", fmt.Errorf("open %s: %w", ref, err)
	}
	defer src.Close()
	blob, mt, err := src.GetManifest(ctx, nil)
	if err != nil {
		return "", fmt.Errorf("read manifest of %s: %w", ref, err)
	}
	if len(blob) > 4<<20 {
		return "", fmt.Errorf("manifest of %s is larger than 4 MiB", ref)
	}
	if mt == "" {
		mt = manifest.GuessMIMEType(blob)
	}
	if manifest.MIMETypeIsMultiImage(mt) {
		list, err := manifest.ListFromBlob(blob, mt)
		if err != nil {
			return "", fmt.Errorf("parse manifest list of %s: %w", ref, err)
		}
		d, err := list.ChooseInstance(sys)
		if err != nil {
			return "", fmt.Errorf("choose image for this platform from %s: %w", ref, err)
		}
		return d.String(), nil
	}
	d, err := manifest.Digest(blob)
	if err != nil {
		return "", fmt.Errorf("digest of the manifest of %s: %w", ref, err)
	}
	return d.String(), nil
}
