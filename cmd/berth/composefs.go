package main

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/berth-dev/berth/internal/composefs"
)

func init() { addCommand(newComposefsCmd) }

// composefsSub holds constructors of further `berth composefs`
// subcommands added from other files (mount, ls).
var composefsSub []func() *cobra.Command

func newComposefsCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "composefs",
		Short: "Create, inspect and mount composefs images",
	}
	cmd.AddCommand(newComposefsCreateCmd(), newComposefsDigestCmd())
	for _, f := range composefsSub {
		cmd.AddCommand(f())
	}
	return cmd
}

// composefsBuildFlags are the mkcomposefs flags shared by create and digest.
type composefsBuildFlags struct {
	minVersion, maxVersion, threads               int
	useEpoch, skipDevices, skipXattrs, userXattrs bool
}

func (b *composefsBuildFlags) register(cmd *cobra.Command) {
	f := cmd.Flags()
	f.IntVar(&b.minVersion, "min-version", 0, "lowest composefs format version `N` to use")
	f.IntVar(&b.maxVersion, "max-version", 1, "highest composefs format version `N` to use when the tree needs it")
	f.BoolVar(&b.useEpoch, "use-epoch", false, "make all mtimes zero")
	f.BoolVar(&b.skipDevices, "skip-devices", false, "leave out device nodes")
	f.BoolVar(&b.skipXattrs, "skip-xattrs", false, "store no xattrs")
	f.BoolVar(&b.userXattrs, "user-xattrs", false, "store only user.* xattrs")
	f.IntVar(&b.threads, "threads", 0, "read and hash files with `N` threads (default: number of CPUs)")
}

func (b *composefsBuildFlags) options(cmd *cobra.Command) (composefs.ScanOptions, composefs.WriteOptions) {
	f := cmd.Flags()
	w := composefs.VersionOptions(b.minVersion, b.maxVersion, f.Changed("min-version"), f.Changed("max-version"))
	s := composefs.ScanOptions{Workers: b.threads, UseEpoch: b.useEpoch, SkipDevices: b.skipDevices, SkipXattrs: b.skipXattrs, UserXattrs: b.userXattrs}
	return s, w
}

func newComposefsCreateCmd() *cobra.Command {
	var bf composefsBuildFlags
	var digestStore string
	var fromFile, printDigest, printDigestOnly bool
	cmd := &cobra.Command{
		Use:   "create SOURCE [IMAGE]",
		Short: "Create a composefs image from a directory or a dump file (like mkcomposefs)",
		Long: `Create a composefs image byte-identical to mkcomposefs 1.0.8's.

SOURCE is a directory, or with --from-file a composefs-dump(5) file ("-" reads
standard input). IMAGE is the output file ("-" writes to standard output); it
is omitted with --print-digest-only.`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if printDigestOnly {
				printDigest = true
				if len(args) == 2 {
					return errors.New("cannot give an image path with --print-digest-only")
				}
			} else if len(args) < 2 {
				return errors.New("no image path given (or use --print-digest-only)")
			}
			scan, write := bf.options(cmd)
			opts := composefs.CreateOptions{
				Source:      args[0],
				FromFile:    fromFile,
				DigestStore: digestStore,
				Write:       write,
				Scan:        scan,
				Stdin:       cmd.InOrStdin(),
				Stdout:      cmd.OutOrStdout(),
			}
			if len(args) == 2 {
				opts.Output = args[1]
				if f, ok := opts.Stdout.(*os.File); ok && opts.Output == "-" && term.IsTerminal(int(f.Fd())) {
					return errors.New("standard output is a terminal; refusing to write an image to it")
				}
			}
			digest, err := composefs.Create(opts)
			if err != nil {
				return err
			}
			switch {
			case opts.Output == "-":
				// Standard output carries the image; the digest goes to stderr.
				if printDigest {
					fmt.Fprintln(cmd.ErrOrStderr(), hex.EncodeToString(digest))
				}
			case global.JSON:
				return printComposefsJSON(cmd.OutOrStdout(), opts.Output, digest)
			case printDigest:
				fmt.Fprintln(cmd.OutOrStdout(), hex.EncodeToString(digest))
			}
			return nil
		},
	}
	bf.register(cmd)
	f := cmd.Flags()
	f.StringVar(&digestStore, "digest-store", "", "copy external files into the object store `DIR` (DIR/xx/<rest of digest>)")
	f.BoolVar(&fromFile, "from-file", false, "SOURCE is a composefs dump file, not a directory")
	f.BoolVar(&printDigest, "print-digest", false, "print the composefs digest (fs-verity digest of the image)")
	f.BoolVar(&printDigestOnly, "print-digest-only", false, "print the composefs digest and write no image")
	return cmd
}

func printComposefsJSON(w io.Writer, image string, digest []byte) error {
	out := struct {
		Image  string `json:"image,omitempty"`
		Digest string `json:"digest"`
	}{image, hex.EncodeToString(digest)}
	return json.NewEncoder(w).Encode(out)
}

func newComposefsDigestCmd() *cobra.Command {
	var bf composefsBuildFlags
	cmd := &cobra.Command{
		Use:   "digest DIR|FILE",
		Short: "Print the composefs digest of a directory, or the fs-verity digest of a file",
		Long: `For a directory, print the composefs digest of the image "berth composefs
create" would write from it; for a file (such as an image), print its SHA-256
fs-verity digest.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			scan, write := bf.options(cmd)
			digest, _, err := composefs.PathDigest(args[0], scan, write)
			if err != nil {
				return err
			}
			if global.JSON {
				return printComposefsJSON(cmd.OutOrStdout(), "", digest)
			}
			fmt.Fprintln(cmd.OutOrStdout(), hex.EncodeToString(digest))
			return nil
		},
	}
	bf.register(cmd)
	return cmd
}
