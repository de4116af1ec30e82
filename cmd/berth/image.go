package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/progress"
	"github.com/berth-dev/berth/internal/store"
)

func init() { addCommand(newImageCmd) }

func newImageCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Pull, list, inspect, remove and mount images in the store",
	}
	cmd.AddCommand(newImagePullCmd(), newImageLsCmd(), newImageInspectCmd(), newImageRmCmd(), newImageMountCmd())
	return cmd
}

func imagePrintJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newImagePullCmd() *cobra.Command {
	var policy string
	var insecure bool
	var jobs int
	cmd := &cobra.Command{
		Use:   "pull REF",
		Short: "Pull an image and import it into the store as a composefs image",
		Long: `Pull an image and import it into the store as a composefs image.

REF names the image with its transport: docker://registry/name:tag (the
default when no transport is given), oci:DIR[:TAG], oci-archive:FILE[:TAG],
docker-archive:FILE[:NAME:TAG] or containers-storage:NAME. registries.conf,
auth.json and containers-policy.json are honoured as podman and skopeo do.

A short name without transport and registry (debian:trixie) is resolved as
podman resolves it in a script: a short-name alias in registries.conf wins,
else each unqualified-search-registries entry is tried in order. berth never
prompts: with short-name-mode "enforcing" and more than one search registry
the pull fails and asks for the full name. The image is recorded under the
name it resolved to. $CONTAINERS_REGISTRIES_CONF names another registries.conf.

Signatures are verified as containers-policy.json requires: "signedBy"
(GPG simple signing, read from the lookaside of containers-registries.d)
and "sigstoreSigned" (with use-sigstore-attachments: true in
containers-registries.d for the registry).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			rep := progress.New(os.Stderr, progress.Options{Quiet: global.Quiet, JSON: global.JSON})
			img, err := oci.Pull(cmd.Context(), args[0], oci.PullOptions{
				Sysroot:               global.Sysroot,
				PolicyPath:            policy,
				InsecureSkipTLSVerify: insecure,
				Jobs:                  jobs,
				Progress:              rep,
			})
			if err != nil {
				return err
			}
			if global.JSON {
				return imagePrintJSON(img)
			}
			if !global.Quiet {
				fmt.Printf("%s\n  manifest  %s\n  composefs %s\n  kernels   %s\n  %d files, %s; layers fetched %d, reused %d\n",
					img.Ref, img.ManifestDigest, img.ComposefsDigest, kernelList(img), img.Files, imageHumanSize(img.Size),
					img.Stats.LayersFetched, img.Stats.LayersReused)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&policy, "policy", "", "containers-policy.json `FILE` (default: as podman looks it up)")
	cmd.Flags().BoolVar(&insecure, "insecure-skip-tls-verify", false, "allow plain HTTP and unverified TLS registries")
	cmd.Flags().IntVar(&jobs, "jobs", 2, "layers to import in parallel")
	return cmd
}

func kernelList(img *oci.Image) string {
	if len(img.Kernels) == 0 {
		return "none (not bootable: " + (&oci.NoKernelError{}).Error() + ")"
	}
	return strings.Join(img.Kernels, " ")
}

func imageHumanSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func imageTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Format("2006-01-02 15:04:05 MST")
}

func newImageLsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "ls",
		Short: "List the images in the store",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			imgs, err := oci.ListImages(global.Sysroot)
			if err != nil {
				return err
			}
			if global.JSON {
				if imgs == nil {
					imgs = []*oci.Image{}
				}
				return imagePrintJSON(imgs)
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "REF\tCOMPOSEFS\tKERNELS\tSIZE\tPULLED")
			for _, img := range imgs {
				k := strings.Join(img.Kernels, ",")
				if k == "" {
					k = "-"
				}
				fmt.Fprintf(tw, "%s\t%.12s\t%s\t%s\t%s\n", img.Ref, img.ComposefsDigest, k, imageHumanSize(img.Size), img.Pulled.Format("2006-01-02 15:04"))
			}
			return tw.Flush()
		},
	}
}

func newImageInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect REF",
		Short: "Show an image's digests, kernels, size and layers (REF: ref, manifest or composefs digest)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			img, err := oci.LookupImage(global.Sysroot, args[0])
			if err != nil {
				return err
			}
			if global.JSON {
				return imagePrintJSON(img)
			}
			fmt.Printf("Ref:        %s\nTransport:  %s\nManifest:   %s\nConfig:     %s\nComposefs:  %s\nKernels:    %s\nPlatform:   %s/%s\nSize:       %s in %d files\nCreated:    %s\nPulled:     %s\nLayers:\n",
				img.Ref, img.Transport, img.ManifestDigest, img.ConfigDigest, img.ComposefsDigest, kernelList(img),
				img.OS, img.Architecture, imageHumanSize(img.Size), img.Files, imageTime(img.Created), imageTime(img.Pulled))
			for i, l := range img.Layers {
				fmt.Printf("  %2d  %s  %10s  %d entries\n", i, l.Digest, imageHumanSize(l.Size), l.Files)
			}
			return nil
		},
	}
}

func newImageRmCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rm REF...",
		Short: "Remove image records (their files go with the next `berth cleanup`)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, ref := range args {
				if err := oci.RemoveImage(global.Sysroot, ref); err != nil {
					return err
				}
				if !global.Quiet && !global.JSON {
					fmt.Printf("removed %s\n", ref)
				}
			}
			return nil
		},
	}
}

func newImageMountCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "mount REF DIR",
		Short: "Mount an image read-only at DIR (unmount with umount DIR)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			img, err := oci.LookupImage(global.Sysroot, args[0])
			if err != nil {
				return err
			}
			l := store.At(global.Sysroot)
			return composefs.Mount(args[1], composefs.MountOptions{Image: l.Image(img.ComposefsDigest), Objects: l.Objects()})
		},
	}
}
