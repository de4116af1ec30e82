package api

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/godbus/dbus/v5"

	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/localchanges"
	"github.com/berth-dev/berth/internal/store"
)

// The local-changes methods of org.berth1.Manager (Diff is in server.go)
// and the CLI side of diff and reset.

// maxResetPaths bounds a Reset call's path list.
const maxResetPaths = 4096

// Reset drops local changes of a deployment (the booted one unless the
// "deployment" option names another). The booted deployment's reset is
// recorded and applied at the next boot. It returns the
// localchanges.ResetResult as JSON.
func (m *manager) Reset(sender dbus.Sender, paths []string, options map[string]dbus.Variant) (string, *dbus.Error) {
	m.s.touch()
	if err := m.s.cfg.Authorizer.Authorize(string(sender), ActionLocalChanges); err != nil {
		m.s.log.Warn("access denied", "BERTH_ACTION", ActionLocalChanges, "BERTH_SENDER", string(sender))
		return "", err
	}
	invalid := func(format string, args ...any) (string, *dbus.Error) {
		return "", dbus.NewError(ErrInvalidArgs, []any{fmt.Sprintf(format, args...)})
	}
	var id string
	var all, cancel bool
	for k, v := range options {
		var ok bool
		switch k {
		case "deployment":
			id, ok = v.Value().(string)
		case "all":
			all, ok = v.Value().(bool)
		case "cancel":
			cancel, ok = v.Value().(bool)
		default:
			return invalid("reset: unknown option %q", k)
		}
		if !ok {
			return invalid("reset: option %q has type %s", k, v.Signature())
		}
	}
	// An empty list never means "everything" by accident: that needs all.
	if cancel && (all || len(paths) > 0) {
		return invalid("reset: cancel takes no paths and not all")
	}
	if !cancel && all == (len(paths) > 0) {
		return invalid("reset: give paths, or the option all=true, not both or neither")
	}
	if len(paths) > maxResetPaths {
		return invalid("reset: %d paths, at most %d", len(paths), maxResetPaths)
	}
	booted := deploy.BootedID(m.s.cfg.Sysroot)
	if id == "" {
		if booted == "" {
			return invalid("reset: no deployment given and none is booted")
		}
		id = booted
	}
	if _, _, err := deploy.ParseID(id); err != nil {
		return invalid("%v", err)
	}
	if j := m.s.ActiveJob(); j != nil {
		return "", dbus.NewError(ErrBusy, []any{fmt.Sprintf("job %s (%s) is running; wait for it", j.path, j.kind)})
	}
	res, err := resetOrCancel(store.At(m.s.cfg.Sysroot), id, cancel, localchanges.ResetOptions{Paths: paths, All: all, Booted: booted})
	if err != nil {
		return "", resetDBusError(err)
	}
	m.s.log.Info("reset", "BERTH_DEPLOYMENT", id, "BERTH_PENDING", fmt.Sprint(res.Pending), "BERTH_RESET_ALL", fmt.Sprint(res.All),
		"BERTH_RESET_CHANGES", fmt.Sprint(len(res.Changes)), "BERTH_SENDER", string(sender))
	b, err := json.Marshal(res)
	if err != nil {
		return "", dbus.NewError(ErrFailed, []any{err.Error()})
	}
	return string(b), nil
}

// resetOrCancel resets, or drops the pending reset (cancel).
func resetOrCancel(l store.Layout, id string, cancel bool, opts localchanges.ResetOptions) (*localchanges.ResetResult, error) {
	if !cancel {
		return localchanges.Reset(l, id, opts)
	}
	if _, err := deploy.Read(l, id); err != nil {
		return nil, err
	}
	had, err := localchanges.CancelPendingReset(l, id)
	if err != nil {
		return nil, err
	}
	return &localchanges.ResetResult{Deployment: id, Paths: []string{}, Changes: []localchanges.Change{}, Cancelled: had}, nil
}

func resetDBusError(err error) *dbus.Error {
	switch {
	case errors.Is(err, deploy.ErrNotFound):
		return dbus.NewError(ErrNotFound, []any{err.Error()})
	case errors.Is(err, deploy.ErrBusy):
		return dbus.NewError(ErrBusy, []any{err.Error()})
	case localchanges.IsRefusal(err):
		return dbus.NewError(ErrInvalidArgs, []any{err.Error()})
	}
	return dbus.NewError(ErrFailed, []any{err.Error()})
}

// Reset calls berthd's Reset.
func (c *Client) Reset(paths []string, options map[string]dbus.Variant) (string, error) {
	if paths == nil {
		paths = []string{}
	}
	if options == nil {
		options = map[string]dbus.Variant{}
	}
	var s string
	err := c.manager().Call(ManagerInterface+".Reset", dbus.FlagAllowInteractiveAuthorization, paths, options).Store(&s)
	return s, err
}

// DefaultDeployment is the deployment diff and reset work on when none is
// named: the booted one, or (not booted from sysroot) the newest.
func DefaultDeployment(sysroot string) (string, error) {
	if id := deploy.BootedID(sysroot); id != "" {
		return id, nil
	}
	deps, err := deploy.List(store.At(sysroot))
	if err != nil {
		return "", err
	}
	if len(deps) == 0 {
		return "", fmt.Errorf("no deployments below %s", store.At(sysroot).Deployments())
	}
	return deps[len(deps)-1].ID, nil
}

// DiffAuto lists the local changes of deployment id ("" = the default)
// through berthd when it is on the bus (and direct is false), else from
// the disk below sysroot.
func DiffAuto(sysroot string, direct bool, address, id string) (*localchanges.DiffResult, string, error) {
	if !direct {
		c, err := Connect(address)
		if err == nil {
			defer c.Close()
			s, err := c.Diff(id)
			if err != nil {
				return nil, ViaDaemon, fmt.Errorf("diff: %w", err)
			}
			var res localchanges.DiffResult
			if err := json.Unmarshal([]byte(s), &res); err != nil {
				return nil, ViaDaemon, fmt.Errorf("diff: berthd's answer: %w", err)
			}
			return &res, ViaDaemon, nil
		}
		if !errors.Is(err, ErrNoDaemon) {
			return nil, ViaDaemon, err
		}
	}
	if id == "" {
		var err error
		if id, err = DefaultDeployment(sysroot); err != nil {
			return nil, ViaDirect, fmt.Errorf("diff: %w", err)
		}
	}
	res, err := localchanges.Diff(store.At(sysroot), id)
	return res, ViaDirect, err
}

// ResetRequest is what the CLI's reset asks for.
type ResetRequest struct {
	Sysroot    string
	Direct     bool   // do not use berthd (--sysroot)
	Address    string // bus address ("" = system bus)
	Deployment string // "" = the default
	Paths      []string
	All        bool
	Cancel     bool // drop the pending reset instead
}

// ResetAuto resets local changes through berthd when it is on the bus
// (and Direct is false: a non-root user needs it, it asks polkit), else
// directly on the disk below Sysroot.
func ResetAuto(r ResetRequest) (*localchanges.ResetResult, string, error) {
	if !r.Direct {
		c, err := Connect(r.Address)
		if err == nil {
			defer c.Close()
			opts := map[string]dbus.Variant{}
			if r.Deployment != "" {
				opts["deployment"] = dbus.MakeVariant(r.Deployment)
			}
			if r.All {
				opts["all"] = dbus.MakeVariant(true)
			}
			if r.Cancel {
				opts["cancel"] = dbus.MakeVariant(true)
			}
			s, err := c.Reset(r.Paths, opts)
			if err != nil {
				return nil, ViaDaemon, fmt.Errorf("reset: %w", err)
			}
			var res localchanges.ResetResult
			if err := json.Unmarshal([]byte(s), &res); err != nil {
				return nil, ViaDaemon, fmt.Errorf("reset: berthd's answer: %w", err)
			}
			return &res, ViaDaemon, nil
		}
		if !errors.Is(err, ErrNoDaemon) {
			return nil, ViaDaemon, err
		}
	}
	id := r.Deployment
	if id == "" {
		var err error
		if id, err = DefaultDeployment(r.Sysroot); err != nil {
			return nil, ViaDirect, fmt.Errorf("reset: %w", err)
		}
	}
	res, err := resetOrCancel(store.At(r.Sysroot), id, r.Cancel, localchanges.ResetOptions{Paths: r.Paths, All: r.All, Booted: deploy.BootedID(r.Sysroot)})
	return res, ViaDirect, err
}
