package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/berth-dev/berth/internal/uki"
)

func init() { addCommand(newUKICmd) }

func newUKICmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "uki",
		Short: "Build and inspect Unified Kernel Images",
	}
	cmd.AddCommand(newUKIBuildCmd(), newUKIInspectCmd())
	return cmd
}

func newUKIBuildCmd() *cobra.Command {
	var (
		out, stub, stubRoot, linux, cmdline, cmdlineFile, osrel, uname, sbat, pcrpkey, pcrKey, key, cert string
		initrds                                                                                          []string
	)
	cmd := &cobra.Command{
		Use:   "build -o OUT --linux VMLINUZ [--initrd FILE]... [flags]",
		Short: "Assemble a UKI from systemd-stub, a kernel and initrds (optionally signed)",
		Long: `Assemble a Unified Kernel Image (UAPI.5) from systemd-stub and write it to OUT,
plus the predicted PCR 11 values to OUT.pcr11.json (systemd-measure's format).
The stub is --stub, else the one under --stub-root (an image root), else the host's.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" || linux == "" {
				return fmt.Errorf("uki build: -o and --linux are required")
			}
			var opts uki.Options
			var err error
			switch {
			case stub != "":
				opts.Stub, err = os.ReadFile(stub)
			default:
				root := stubRoot
				if root == "" {
					root = global.Sysroot
				}
				opts.Stub, _, err = uki.FindStub(os.DirFS(root))
			}
			if err != nil {
				return fmt.Errorf("uki build: %w", err)
			}
			if opts.Linux, err = os.ReadFile(linux); err != nil {
				return fmt.Errorf("uki build: %w", err)
			}
			for _, in := range initrds {
				b, err := os.ReadFile(in)
				if err != nil {
					return fmt.Errorf("uki build: %w", err)
				}
				opts.Initrds = append(opts.Initrds, b)
			}
			opts.Cmdline = cmdline
			if cmdlineFile != "" {
				b, err := os.ReadFile(cmdlineFile)
				if err != nil {
					return fmt.Errorf("uki build: %w", err)
				}
				opts.Cmdline = strings.TrimRight(string(b), "\n")
			}
			if osrel != "" {
				if opts.OSRelease, err = os.ReadFile(osrel); err != nil {
					return fmt.Errorf("uki build: %w", err)
				}
			}
			if pcrpkey != "" {
				if opts.PCRPKey, err = os.ReadFile(pcrpkey); err != nil {
					return fmt.Errorf("uki build: %w", err)
				}
			}
			if pcrKey != "" {
				if opts.PCRSignKey, err = uki.LoadPrivateKey(pcrKey); err != nil {
					return fmt.Errorf("uki build: %w", err)
				}
			}
			opts.Uname, opts.SBAT = uname, sbat
			if (key == "") != (cert == "") {
				return fmt.Errorf("uki build: --sign-key and --sign-cert go together")
			}
			if key != "" {
				if opts.SignKey, opts.SignCert, err = uki.LoadSigner(key, cert); err != nil {
					return fmt.Errorf("uki build: %w", err)
				}
			}
			res, err := uki.Build(out, opts)
			if err != nil {
				return err
			}
			if global.JSON {
				return json.NewEncoder(os.Stdout).Encode(res)
			}
			if !global.Quiet {
				signed := "unsigned"
				if res.Signed {
					signed = "signed"
				}
				fmt.Printf("%s: %d bytes, %s, stub %s\nauthenticode sha256 %s\n", res.Path, res.Size, signed, res.StubVersion, res.AuthenticodeSHA256)
				if v := res.PCR11["sha256"]; len(v) > 0 {
					fmt.Printf("pcr11 sha256 (%s) %s\n", v[len(v)-1].Phase, v[len(v)-1].Hash)
				}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&out, "output", "o", "", "write the UKI to `FILE`")
	f.StringVar(&stub, "stub", "", "systemd-stub `FILE` (linuxx64.efi.stub)")
	f.StringVar(&stubRoot, "stub-root", "", "find systemd-stub below `DIR` (an image root)")
	f.StringVar(&linux, "linux", "", "kernel image `FILE`")
	f.StringArrayVar(&initrds, "initrd", nil, "initrd `FILE` (repeat to concatenate)")
	f.StringVar(&cmdline, "cmdline", "", "kernel command line `TEXT`")
	f.StringVar(&cmdlineFile, "cmdline-file", "", "read the kernel command line from `FILE`")
	f.StringVar(&osrel, "os-release", "", "os-release `FILE` for .osrel")
	f.StringVar(&uname, "uname", "", "kernel release `TEXT` for .uname")
	f.StringVar(&sbat, "sbat", "", "extra SBAT CSV `LINES` (default: the generic uki entry)")
	f.StringVar(&pcrpkey, "pcrpkey", "", "PEM public key `FILE` for .pcrpkey")
	f.StringVar(&pcrKey, "pcr-key", "", "sign the expected PCR 11 values into .pcrsig with this PEM RSA private key `FILE` (its public key becomes .pcrpkey)")
	f.StringVar(&key, "sign-key", "", "sign with this PEM RSA private key `FILE` (Secure Boot db key)")
	f.StringVar(&cert, "sign-cert", "", "PEM certificate `FILE` of the signing key")
	return cmd
}

func newUKIInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect UKI",
		Short: "List the sections of a UKI (or any PE file)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			secs, err := uki.ReadSectionsFile(filepath.Clean(args[0]))
			if err != nil {
				return fmt.Errorf("uki inspect: %w", err)
			}
			type info struct {
				Size   int    `json:"size"`
				SHA256 string `json:"sha256"`
				Text   string `json:"text,omitempty"`
			}
			m := map[string]info{}
			var names []string
			for name, b := range secs {
				sum := sha256.Sum256(b)
				in := info{Size: len(b), SHA256: hex.EncodeToString(sum[:])}
				switch name {
				case ".osrel", ".cmdline", ".uname", ".sbat", ".pcrpkey", ".sdmagic":
					in.Text = strings.TrimRight(string(b), "\x00")
				}
				m[name] = in
				names = append(names, name)
			}
			if global.JSON {
				return json.NewEncoder(os.Stdout).Encode(m)
			}
			sort.Strings(names)
			for _, n := range names {
				fmt.Printf("%-9s %10d  sha256 %s\n", n, m[n].Size, m[n].SHA256)
				if t := m[n].Text; t != "" && !global.Quiet {
					for _, l := range strings.Split(strings.TrimRight(t, "\n"), "\n") {
						fmt.Printf("          %s\n", l)
					}
				}
			}
			return nil
		},
	}
}
