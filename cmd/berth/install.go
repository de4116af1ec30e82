package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/install"
	"github.com/berth-dev/berth/internal/progress"
)

func init() { addCommand(newInstallCmd) }

// installFlags are shared by to-disk and to-filesystem.
type installFlags struct {
	image       string
	targetRef   string
	sshKeys     string
	kargs       []string
	local       string
	noVerity    bool
	kernel      string
	skipKernel  bool
	policy      string
	tlsInsecure bool
	staging     string
}

func (f *installFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.image, "image", "", "the image to install, with its transport (`REF`: oci-archive:FILE, oci:DIR, docker://…)")
	fl.StringVar(&f.targetRef, "target-imgref", "", "the image `REF` the installed system tracks for upgrades (default: --image)")
	fl.StringVar(&f.sshKeys, "root-ssh-authorized-keys", "", "install the keys in `FILE` as root's ~/.ssh/authorized_keys")
	fl.StringArrayVar(&f.kargs, "karg", nil, "append `ARG` to the kernel command line (repeatable)")
	fl.StringVar(&f.local, "local", "persistent", "what happens to local changes: persistent, transient or readonly")
	fl.BoolVar(&f.noVerity, "insecure-no-verity", false, "boot even where fs-verity is unavailable (berth.composefs=?…): the root is NOT verified")
	kverFlag(fl, &f.kernel, "kernel `VERSION` to boot when the image has several (default: the newest)")
	fl.BoolVar(&f.skipKernel, "skip-kernel-check", false, "install a kernel whose version looks too old for berth (a distribution kernel with overlayfs data-only layers and verity= backported)")
	fl.StringVar(&f.staging, "staging-dir", "", "pull and check the image below `DIR` before the target is touched (default: $"+install.StagingEnv+", else "+install.DefaultStagingDir+")")
	fl.StringVar(&f.policy, "policy", "", "containers-policy.json `FILE` to verify the image against")
	fl.BoolVar(&f.tlsInsecure, "insecure-skip-tls-verify", false, "allow plain HTTP or unverified TLS for the registry")
	_ = cmd.MarkFlagRequired("image")
}

func (f *installFlags) options() install.Options {
	mode := progress.Plain
	switch {
	case global.Quiet:
		mode = progress.Quiet
	case global.JSON:
		mode = progress.Quiet // the result is printed as JSON at the end
	}
	return install.Options{
		Image: f.image, TargetImageRef: f.targetRef, SSHAuthorizedKeys: f.sshKeys, KernelArgs: f.kargs,
		LocalMode: cmdline.LocalMode(f.local), InsecureNoVerity: f.noVerity, Kernel: f.kernel, SkipKernelCheck: f.skipKernel,
		PolicyPath: f.policy, InsecureSkipTLSVerify: f.tlsInsecure, StagingDir: f.staging,
		Progress: progress.New(os.Stderr, progress.Options{Mode: mode}),
	}
}

func newInstallCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Install an image with berth onto a disk or a mounted filesystem",
	}

	var diskFlags installFlags
	var wipe bool
	var fsType, size string
	toDisk := &cobra.Command{
		Use:   "to-disk TARGET",
		Short: "Partition TARGET (a block device or a disk image file) and install the image on it",
		Long: `Pull the image into a staging store (--staging-dir) and check it: the
signature policy, a kernel new enough for berth's composefs root, systemd-stub
and systemd-boot (from the image, else this machine), berth's initramfs, and
the space it needs. Only then partition TARGET (a whole block device, or a disk
image file that is created or extended sparse to --size) with GPT: a 512 MiB
FAT32 EFI System Partition and a root partition (ext4 with fs-verity, or
btrfs). Copy the image into the root's berth store, create the first
deployment and a UKI, and install systemd-boot with a boot-counted entry. A
refusal leaves TARGET as it was.`,
		Args: cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			opts := diskFlags.options()
			opts.Wipe, opts.Filesystem = wipe, fsType
			if c.Flags().Changed("size") {
				n, err := parseSize(size)
				if err != nil {
					return fmt.Errorf("--size: %w", err)
				}
				opts.Size = n
			}
			ctx, stop := signal.NotifyContext(c.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			res, err := install.ToDisk(ctx, args[0], opts)
			return report(res, err)
		},
	}
	diskFlags.register(toDisk)
	toDisk.Flags().BoolVar(&wipe, "wipe", false, "overwrite a disk that has a partition table or data")
	toDisk.Flags().StringVar(&fsType, "filesystem", "ext4", "root filesystem: ext4 or btrfs")
	toDisk.Flags().StringVar(&size, "size", "", "size of a disk image file target: a new file is created sparse with it, a smaller one extended (default 8G for a new file)")

	var fsFlags installFlags
	var esp string
	toFS := &cobra.Command{
		Use:   "to-filesystem DIR",
		Short: "Install the image into the root filesystem mounted at DIR and the ESP mounted at --esp",
		Args:  cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(c.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			res, err := install.ToFilesystem(ctx, args[0], esp, fsFlags.options())
			return report(res, err)
		},
	}
	fsFlags.register(toFS)
	toFS.Flags().StringVar(&esp, "esp", "", "the mounted EFI System Partition `DIR`")
	_ = toFS.MarkFlagRequired("esp")

	cmd.AddCommand(toDisk, toFS)
	return cmd
}

// kverFlag registers --kver and its old name --kernel (hidden, deprecated:
// it still works and says to use --kver).
func kverFlag(fl *pflag.FlagSet, p *string, usage string) {
	fl.StringVar(p, "kver", "", usage)
	fl.StringVar(p, "kernel", "", usage)
	_ = fl.MarkDeprecated("kernel", "use --kver")
}

// report prints the result of an installation.
func report(res *install.Result, err error) error {
	if err != nil {
		return err
	}
	if global.JSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	if global.Quiet {
		return nil
	}
	fmt.Printf("installed deployment %s in %s\n", res.Deployment.ID, res.Total.Round(100*time.Millisecond))
	if res.Target != "" {
		fmt.Printf("  target:      %s\n", res.Target)
	}
	fmt.Printf("  boot entry:  %s\n", res.Entry)
	fmt.Printf("  cmdline:     %s\n", res.Cmdline)
	fmt.Printf("  initramfs:   %d KiB, UKI %d KiB, store %d MiB\n", res.InitrdSize>>10, res.UKISize>>10, res.StoreBytes>>20)
	if res.VerityPending {
		fmt.Println("  fs-verity:   not available here; berth-init enables it on every object at first boot")
	}
	if res.RuntimeNote != "" {
		fmt.Printf("  runtime:     %s\n", res.RuntimeNote)
	}
	return nil
}

// parseSize reads a size with an optional binary suffix (K, M, G, T).
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(strings.ToUpper(s))
	s = strings.TrimSuffix(strings.TrimSuffix(s, "B"), "I")
	mult := int64(1)
	if s != "" {
		switch s[len(s)-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			s = s[:len(s)-1]
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("invalid size %q (e.g. 8G, 512M)", s)
	}
	return n * mult, nil
}
