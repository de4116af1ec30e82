package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/store"
)

func init() {
	composefsSub = append(composefsSub, newComposefsMountCmd, newComposefsUmountCmd,
		newComposefsLsCmd, newComposefsDumpCmd, newComposefsCheckCmd)
}

func newComposefsMountCmd() *cobra.Command {
	var opts composefs.MountOptions
	cmd := &cobra.Command{
		Use:   "mount IMAGE MOUNTPOINT [--objects DIR]",
		Short: "Mount a composefs image (EROFS + overlayfs over an object store)",
		Long: `Mount a composefs image at MOUNTPOINT: the image as EROFS (file-backed, or on
a loop device), under overlayfs with the object store as its data-only layer.
Read-only unless --upper and --work are given. --verity makes overlayfs check
every object's fs-verity digest (verity=require). Without --objects, the
object store of the berth installation (--sysroot) is used.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts.Image = args[0]
			if opts.Objects == "" {
				opts.Objects = store.At(global.Sysroot).Objects()
			}
			return composefs.Mount(args[1], opts)
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.Objects, "objects", "", "object store `DIR` (DIR/xx/<rest of digest>; default: the installation's store)")
	f.BoolVar(&opts.Verity, "verity", false, "require fs-verity on every object (overlayfs verity=require)")
	f.StringVar(&opts.Upper, "upper", "", "writable overlay upper `DIR` (needs --work)")
	f.StringVar(&opts.Work, "work", "", "overlay work `DIR` on the same filesystem as --upper")
	return cmd
}

func newComposefsUmountCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "umount MOUNTPOINT",
		Short: "Unmount a composefs mount",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return composefs.Unmount(args[0])
		},
	}
}

// openComposefsTree reads an image into the input model (composefs's
// rewrites undone), checking its structure first.
func openComposefsTree(path string) (*composefs.Inode, error) {
	im, err := composefs.OpenImage(path)
	if err != nil {
		return nil, err
	}
	if err := im.Check(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return im.Tree()
}

func newComposefsLsCmd() *cobra.Command {
	var long bool
	cmd := &cobra.Command{
		Use:   "ls IMAGE",
		Short: "List the files of a composefs image",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			root, err := openComposefsTree(args[0])
			if err != nil {
				return err
			}
			if global.JSON {
				return json.NewEncoder(os.Stdout).Encode(composefs.ListTree(root))
			}
			return composefs.WriteListing(os.Stdout, root, long)
		},
	}
	cmd.Flags().BoolVarP(&long, "long", "l", false, "show mode, owner, size, mtime, symlink targets and objects")
	return cmd
}

func newComposefsDumpCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "dump IMAGE",
		Short: "Print a composefs image in the composefs-dump(5) format (input of create --from-file)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			root, err := openComposefsTree(args[0])
			if err != nil {
				return err
			}
			return composefs.WriteDump(os.Stdout, root)
		},
	}
}

func newComposefsCheckCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "check IMAGE",
		Short: "Check the structure of a composefs image",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := composefs.Check(args[0]); err != nil {
				return err
			}
			if !global.Quiet {
				fmt.Printf("%s: ok\n", args[0])
			}
			return nil
		},
	}
}
