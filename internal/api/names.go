// Package api is berth's D-Bus interface (DESIGN §7): the org.berth1
// service that berthd exports on the system bus, the jobs it runs, the
// authorization of callers, and the client the berth CLI uses.
package api

import "github.com/godbus/dbus/v5"

// Bus names, object paths and interfaces of org.berth1.
const (
	BusName          = "org.berth1"
	ManagerPath      = dbus.ObjectPath("/org/berth1")
	ManagerInterface = "org.berth1.Manager"
	JobInterface     = "org.berth1.Job"
	JobPathPrefix    = "/org/berth1/job/"
)

// D-Bus error names returned by berthd.
const (
	ErrBusy         = "org.berth1.Error.Busy"
	ErrFailed       = "org.berth1.Error.Failed"
	ErrNotFound     = "org.berth1.Error.NotFound"
	ErrAccessDenied = "org.freedesktop.DBus.Error.AccessDenied"
	ErrInvalidArgs  = "org.freedesktop.DBus.Error.InvalidArgs"
)

// Polkit action ids (data/polkit/org.berth1.policy).
const (
	ActionUpgrade      = "org.berth1.upgrade"
	ActionSwitch       = "org.berth1.switch"
	ActionRollback     = "org.berth1.rollback"
	ActionCleanup      = "org.berth1.cleanup"
	ActionLocalChanges = "org.berth1.local-changes"
)

// Job kinds (the Kind property).
const (
	KindUpgrade  = "upgrade"
	KindSwitch   = "switch"
	KindRollback = "rollback"
	KindCleanup  = "cleanup"
)

// Job states (the State property; the last three are also the result
// of the Finished signal).
const (
	StateRunning   = "running"
	StateDone      = "done"
	StateFailed    = "failed"
	StateCancelled = "cancelled"
)

// NoJob is the ActiveJob value while no job runs.
const NoJob = dbus.ObjectPath("/")
