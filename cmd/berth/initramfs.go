package main

import (
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"regexp"
	"strings"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/initrd"
	"github.com/berth-dev/berth/internal/store"
)

func init() { addCommand(newInitramfsCmd) }

func newInitramfsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "initramfs", Short: "Build berth's own initramfs"}
	var root, image, kver, out, initBin, comp string
	build := &cobra.Command{
		Use:   "build (--root DIR | --image DIGEST) --kver KVER -o FILE",
		Short: "Build an initramfs with berth-init and the kernel modules of an image",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (root == "") == (image == "") {
				return fmt.Errorf("give exactly one of --root DIR or --image DIGEST")
			}
			opts := initrd.Options{KernelVersion: kver, InitBinary: initBin, Compression: comp}
			if root != "" {
				opts.Root = os.DirFS(root)
			} else {
				fsys, err := imageFS(image)
				if err != nil {
					return err
				}
				opts.Root = fsys
			}
			return writeInitramfs(out, opts)
		},
	}
	f := build.Flags()
	f.StringVar(&root, "root", "", "unpacked image root `DIR`")
	f.StringVar(&image, "image", "", "composefs image `DIGEST` in the store below --sysroot")
	f.StringVar(&kver, "kver", "", "kernel `VERSION` (a directory in /usr/lib/modules)")
	f.StringVarP(&out, "output", "o", "", "write the initramfs to `FILE`")
	f.StringVar(&initBin, "init", "", "berth-init `BINARY` (default: next to berth, else /usr/lib/berth/berth-init)")
	f.StringVar(&comp, "compression", initrd.Zstd, "zstd, gzip or none")
	build.MarkFlagRequired("kver")
	build.MarkFlagRequired("output")
	cmd.AddCommand(build)
	return cmd
}

var digestArg = regexp.MustCompile(`^([0-9a-f]{64}|[0-9a-f]{128})$`)

// imageFS opens a composefs image of the store as a file system.
func imageFS(digest string) (fs.FS, error) {
	digest = strings.TrimPrefix(strings.ToLower(digest), "sha256:")
	if !digestArg.MatchString(digest) {
		return nil, fmt.Errorf("--image wants a composefs digest (64 or 128 hex digits), got %q", digest)
	}
	l := store.At(global.Sysroot)
	im, err := composefs.OpenImage(l.Image(digest))
	if err != nil {
		return nil, err
	}
	tree, err := im.Tree()
	if err != nil {
		return nil, fmt.Errorf("read image %s: %w", digest, err)
	}
	return composefs.TreeFS(tree, l.Objects()), nil
}

// writeInitramfs builds into a temporary file and renames it into place.
func writeInitramfs(out string, opts initrd.Options) error {
	var rep *initrd.Report
	err := fsutil.WriteAtomic(out, 0o644, func(w io.Writer) error {
		var err error
		rep, err = initrd.Build(w, opts)
		return err
	}, nil)
	if err != nil {
		return fmt.Errorf("build initramfs %s: %w", out, err)
	}
	if global.JSON {
		return json.NewEncoder(os.Stdout).Encode(rep)
	}
	if !global.Quiet {
		fmt.Printf("%s: %d bytes (%s; %d bytes uncompressed, %d entries), kernel %s\n", out, rep.Size, rep.Compression, rep.UncompressedSize, rep.Entries, rep.KernelVersion)
		fmt.Printf("  berth-init %s (%d bytes); %d modules (%d bytes)\n", rep.InitBinary, rep.InitSize, len(rep.Modules), rep.ModulesSize)
		if len(rep.Builtin) > 0 {
			fmt.Printf("  built into the kernel: %s\n", strings.Join(rep.Builtin, " "))
		}
	}
	if len(rep.Missing) > 0 {
		fmt.Fprintf(os.Stderr, "berth: warning: modules neither in the image nor built in: %s\n", strings.Join(rep.Missing, " "))
	}
	return nil
}
