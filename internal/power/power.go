// Package power reboots the running system the way `systemctl reboot`
// does: systemd starts reboot.target, so every service stops in order and
// boot counting and the boot loader's one-shot choices take effect. berthd,
// the direct (no daemon) job path and the boot-health check all reboot
// through it. (berth-init, PID 1 of the initramfs, has no systemd and
// calls reboot(2) itself.)
package power

import (
	"context"
	"fmt"

	sdbus "github.com/coreos/go-systemd/v22/dbus"
)

// Reboot asks systemd to reboot now.
func Reboot(ctx context.Context) error {
	c, err := sdbus.NewWithContext(ctx)
	if err != nil {
		return fmt.Errorf("reboot: connect to systemd: %w", err)
	}
	defer c.Close()
	if _, err := c.StartUnitContext(ctx, "reboot.target", "replace-irreversibly", nil); err != nil {
		return fmt.Errorf("reboot: start reboot.target: %w", err)
	}
	return nil
}
