package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/efivar"
)

func init() { addCommand(newBootCmd) }

// bootFlags locate the ESP and the EFI variables.
type bootFlags struct {
	esp     string
	efivars string
}

func (b *bootFlags) register(cmd *cobra.Command) {
	cmd.PersistentFlags().StringVar(&b.esp, "esp", "", "the mounted EFI System Partition `DIR` (default: /efi, /boot/efi or /boot below --sysroot)")
	cmd.PersistentFlags().StringVar(&b.efivars, "efivars", efivar.DefaultDir, "efivarfs `DIR`")
}

func (b *bootFlags) espDir() (boot.ESP, error) {
	if b.esp != "" {
		return boot.ESP{Dir: b.esp}, nil
	}
	d, err := boot.FindESP(global.Sysroot, true)
	return boot.ESP{Dir: d}, err
}

func newBootCmd() *cobra.Command {
	var bf bootFlags
	cmd := &cobra.Command{
		Use:   "boot",
		Short: "Manage systemd-boot and berth's boot entries on the ESP",
	}
	bf.register(cmd)
	withESP := func(use, short string, args cobra.PositionalArgs, run func(esp boot.ESP, args []string) error) *cobra.Command {
		return &cobra.Command{Use: use, Short: short, Args: args, RunE: func(_ *cobra.Command, a []string) error {
			esp, err := bf.espDir()
			if err != nil {
				return err
			}
			return run(esp, a)
		}}
	}
	var from string
	install := withESP("install-loader", "Install systemd-boot and loader.conf into the ESP", cobra.NoArgs, func(esp boot.ESP, _ []string) error {
		root := from
		if root == "" {
			root = global.Sysroot
		}
		return esp.InstallSystemdBoot(os.DirFS(root))
	})
	install.Flags().StringVar(&from, "from", "", "take systemd-boot from below `DIR` (an image root; default: the sysroot)")

	var tries int
	addUKI := withESP("add-uki ID UKI", "Install a UKI as the boot entry of deployment ID (with boot counting)", cobra.ExactArgs(2), func(esp boot.ESP, a []string) error {
		return esp.AddUKI(a[0], a[1], tries)
	})
	addUKI.Flags().IntVar(&tries, "tries", boot.DefaultTries, "boot attempts before the entry counts as bad (0 = no counting)")

	list := withESP("list", "List berth's boot entries in systemd-boot's order", cobra.NoArgs, func(esp boot.ESP, _ []string) error {
		es, err := esp.Entries()
		if err != nil {
			return err
		}
		def, err := esp.Default()
		if err != nil {
			return err
		}
		if global.JSON {
			return json.NewEncoder(os.Stdout).Encode(struct {
				Entries []boot.Entry `json:"entries"`
				Default *boot.Entry  `json:"default"`
			}{es, def})
		}
		for _, e := range es {
			mark := " "
			if def != nil && def.ID == e.ID {
				mark = "*"
			}
			fmt.Printf("%s %-28s %-4s %-13s %s\n", mark, e.ID, e.Type, e.State, e.Path)
		}
		return nil
	})
	setDefault := withESP("set-default ID", "Make deployment ID's entry the default", cobra.ExactArgs(1), func(esp boot.ESP, a []string) error {
		return esp.SetDefault(a[0])
	})
	rollback := withESP("rollback", "Make the previous entry the default (again: swap back)", cobra.NoArgs, func(esp boot.ESP, _ []string) error {
		id, err := esp.Rollback()
		if err == nil && !global.Quiet {
			fmt.Println("default boot entry:", id)
		}
		return err
	})
	remove := withESP("remove ID", "Remove deployment ID's boot entries", cobra.ExactArgs(1), func(esp boot.ESP, a []string) error {
		return esp.Remove(a[0])
	})
	bless := withESP("bless ID", "Mark deployment ID's entry good (drop its boot counter)", cobra.ExactArgs(1), func(esp boot.ESP, a []string) error {
		return esp.Bless(a[0])
	})
	vars := &cobra.Command{
		Use:   "efivars",
		Short: "Show systemd-boot's EFI variables",
		Args:  cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			s := efivar.Store{Dir: bf.efivars}
			out := map[string]any{}
			get := func(name string, f func() (string, error)) {
				if v, err := f(); err == nil {
					out[name] = v
				}
			}
			get("LoaderEntrySelected", s.LoaderEntrySelected)
			get("LoaderEntryDefault", s.LoaderEntryDefault)
			get("LoaderBootCountPath", s.LoaderBootCountPath)
			if v, err := s.LoaderEntries(); err == nil {
				out["LoaderEntries"] = v
			}
			if global.JSON {
				return json.NewEncoder(os.Stdout).Encode(out)
			}
			for _, k := range []string{"LoaderEntrySelected", "LoaderEntryDefault", "LoaderBootCountPath", "LoaderEntries"} {
				if v, ok := out[k]; ok {
					fmt.Printf("%s: %v\n", k, v)
				}
			}
			return nil
		},
	}
	cmd.AddCommand(install, addUKI, list, setDefault, rollback, remove, bless, vars)
	return cmd
}
