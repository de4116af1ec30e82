package main

import (
	"bytes"
	"encoding/json"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/api"
)

func init() { addCommand(newStatusCmd) }

func newStatusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the booted, staged and rollback deployments (--json: bootc's BootcHost shape)",
		Long: "Show the deployments, their images and boot entries, /etc merge conflicts and the last job.\n" +
			"Asks berthd when it is on the system bus; with --sysroot (or without berthd) reads the disk directly.\n" +
			"The --json output is described by docs/status.schema.json.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			direct := cmd.Flag("sysroot").Changed
			h, raw, _, err := api.StatusAuto(global.Sysroot, direct, "")
			if err != nil {
				return err
			}
			if global.JSON {
				var out bytes.Buffer
				if err := json.Indent(&out, raw, "", "  "); err != nil {
					return err
				}
				out.WriteByte('\n')
				_, err := cmd.OutOrStdout().Write(out.Bytes())
				return err
			}
			h.WriteText(cmd.OutOrStdout())
			return nil
		},
	}
}
