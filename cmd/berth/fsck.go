package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/fsck"
)

func init() { addCommand(newFsckCmd) }

func newFsckCmd() *cobra.Command {
	var verify bool
	var esp string
	cmd := &cobra.Command{
		Use:   "fsck",
		Short: "Check the store, deployments and boot entries for consistency (read-only)",
		Long: `Check the berth store below --sysroot for consistency without changing it.

Errors (exit status 1): a composefs image whose file name is not its
fs-verity digest or that is not a valid image, an image that references a
missing object or an object of the wrong size, an image record or a
deployment.json that does not parse or names a missing image, a berth-*
boot entry whose deployment does not exist. With --verify-objects every
object's fs-verity digest is recomputed and compared with its name (this
reads all content).

Warnings (exit status 0): leftovers of interrupted imports and
deployments, objects and images nothing references (run ` + "`berth cleanup`" + `
or ` + "`berth deploy cleanup`" + `), and an unfinished job journal (the next
berth job or berthd start recovers it).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if esp == "" {
				esp = boot.FoundESP(global.Sysroot)
			}
			rep, err := fsck.Check(fsck.Options{Sysroot: global.Sysroot, ESP: esp, VerifyObjects: verify})
			if err != nil {
				return err
			}
			if global.JSON {
				if err := imagePrintJSON(rep); err != nil {
					return err
				}
			} else {
				for _, p := range rep.Errors {
					fmt.Fprintln(os.Stderr, "error:", p)
				}
				if !global.Quiet {
					for _, p := range rep.Warnings {
						fmt.Fprintln(os.Stderr, "warning:", p)
					}
					verified := ""
					if verify {
						verified = fmt.Sprintf(" (%d verified)", rep.ObjectsVerified)
					}
					fmt.Printf("checked %d images, %d objects%s, %d image records, %d layer indexes, %d deployments, %d boot entries: %d errors, %d warnings\n",
						rep.Images, rep.Objects, verified, rep.Records, rep.LayerIndexes, rep.Deployments, rep.BootEntries, len(rep.Errors), len(rep.Warnings))
				}
			}
			if !rep.OK() {
				return fmt.Errorf("fsck: %d errors in %s", len(rep.Errors), global.Sysroot)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&verify, "verify-objects", false, "recompute every object's fs-verity digest (reads all content)")
	cmd.Flags().StringVar(&esp, "esp", "", "ESP `DIR` whose boot entries to check (default: efi, boot/efi or boot below --sysroot)")
	return cmd
}
