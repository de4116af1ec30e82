package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/oci"
)

func init() { addCommand(newCleanupCmd) }

func newCleanupCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "cleanup",
		Short: "Remove images, objects and leftovers that no image record or deployment references",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			rep, err := oci.Cleanup(global.Sysroot)
			if err != nil {
				return err
			}
			if global.JSON {
				return imagePrintJSON(rep)
			}
			if !global.Quiet {
				fmt.Printf("removed %d images, %d objects, %d layer indexes, %d blobs, %d leftovers; freed %s; kept %d images, %d objects\n",
					rep.ImagesRemoved, rep.ObjectsRemoved, rep.LayerIndexesRemoved, rep.BlobsRemoved, rep.TempRemoved,
					imageHumanSize(rep.BytesFreed), rep.ImagesKept, rep.ObjectsKept)
			}
			return nil
		},
	}
}
