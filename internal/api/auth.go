package api

import (
	"fmt"
	"slices"

	"github.com/godbus/dbus/v5"
)

// Authorizer decides whether the bus client sender may perform action.
// A nil return allows it; otherwise the *dbus.Error is the reply.
type Authorizer interface {
	Authorize(sender, action string) *dbus.Error
}

const (
	polkitName  = "org.freedesktop.PolicyKit1"
	polkitPath  = dbus.ObjectPath("/org/freedesktop/PolicyKit1/Authority")
	polkitCheck = "org.freedesktop.PolicyKit1.Authority.CheckAuthorization"
	// polkitAllowInteraction lets polkit ask the user (an agent) for a
	// password when the action's policy says auth_admin.
	polkitAllowInteraction = uint32(1)
)

// BusAuthorizer asks polkit (CheckAuthorization with the caller's
// system-bus-name as subject) when polkit is on the bus, and otherwise
// allows only callers running as uid 0 (GetConnectionUnixUser).
type BusAuthorizer struct {
	Conn *dbus.Conn
	// Interactive allows polkit to start an authentication dialog.
	Interactive bool
}

// polkitSubject is polkit's (sa{sv}) subject.
type polkitSubject struct {
	Kind    string
	Details map[string]dbus.Variant
}

// polkitResult is polkit's (bba{ss}) authorization result.
type polkitResult struct {
	IsAuthorized bool
	IsChallenge  bool
	Details      map[string]string
}

// Authorize implements Authorizer.
func (a *BusAuthorizer) Authorize(sender, action string) *dbus.Error {
	if sender == "" {
		return dbus.NewError(ErrAccessDenied, []any{"no sender on the method call"})
	}
	if a.polkitAvailable() {
		return a.polkit(sender, action)
	}
	var uid uint32
	if err := a.Conn.BusObject().Call("org.freedesktop.DBus.GetConnectionUnixUser", 0, sender).Store(&uid); err != nil {
		return dbus.NewError(ErrAccessDenied, []any{fmt.Sprintf("cannot tell the user of %s: %v", sender, err)})
	}
	if uid != 0 {
		return dbus.NewError(ErrAccessDenied, []any{fmt.Sprintf("%s needs root (polkit is not running; caller %s is uid %d)", action, sender, uid)})
	}
	return nil
}

// polkitAvailable says whether polkit runs or can be started by the bus.
func (a *BusAuthorizer) polkitAvailable() bool {
	var has bool
	if err := a.Conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, polkitName).Store(&has); err == nil && has {
		return true
	}
	var names []string
	if err := a.Conn.BusObject().Call("org.freedesktop.DBus.ListActivatableNames", 0).Store(&names); err == nil {
		return slices.Contains(names, polkitName)
	}
	return false
}

func (a *BusAuthorizer) polkit(sender, action string) *dbus.Error {
	subject := polkitSubject{Kind: "system-bus-name", Details: map[string]dbus.Variant{"name": dbus.MakeVariant(sender)}}
	flags := uint32(0)
	if a.Interactive {
		flags |= polkitAllowInteraction
	}
	var res polkitResult
	call := a.Conn.Object(polkitName, polkitPath).Call(polkitCheck, 0, subject, action, map[string]string{}, flags, "")
	if call.Err != nil {
		return dbus.NewError(ErrAccessDenied, []any{fmt.Sprintf("polkit check of %s for %s failed: %v", action, sender, call.Err)})
	}
	if err := call.Store(&res); err != nil {
		return dbus.NewError(ErrAccessDenied, []any{fmt.Sprintf("polkit check of %s: bad reply: %v", action, err)})
	}
	if !res.IsAuthorized {
		why := "not authorized"
		if res.IsChallenge {
			why = "authentication required (run with an authentication agent, or as root)"
		}
		return dbus.NewError(ErrAccessDenied, []any{fmt.Sprintf("polkit: %s: %s", action, why)})
	}
	return nil
}
