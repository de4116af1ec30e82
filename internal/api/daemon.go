package api

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/coreos/go-systemd/v22/journal"
	"github.com/godbus/dbus/v5"
)

// DaemonOptions configure RunDaemon (berthd's flags).
type DaemonOptions struct {
	Address     string        // bus address; "" = the system bus
	Sysroot     string        // "/" on a running system
	ESP         string        // "" = found below the sysroot
	IdleTimeout time.Duration // exit after this long without jobs or calls; 0 = never
	PolicyPath  string        // containers-policy.json for pulls; "" = the default lookup
	InsecureTLS bool
}

// RunDaemon is berthd: it serves org.berth1 until ctx ends or it has
// been idle for opts.IdleTimeout (bus activation starts it again on the
// next call), telling systemd READY and STATUS through sd_notify.
func RunDaemon(ctx context.Context, opts DaemonOptions) error {
	log := slog.New(NewLogHandler("berthd"))
	var conn *dbus.Conn
	var err error
	if opts.Address == "" {
		conn, err = dbus.ConnectSystemBus()
	} else {
		conn, err = dbus.Connect(opts.Address)
	}
	if err != nil {
		return fmt.Errorf("connect to the bus: %w", err)
	}
	defer conn.Close()
	srv, err := NewServer(Config{
		Conn:    conn,
		Engine:  &SysrootEngine{Sysroot: opts.Sysroot, ESP: opts.ESP, PolicyPath: opts.PolicyPath, InsecureTLS: opts.InsecureTLS},
		Sysroot: opts.Sysroot,
		ESP:     opts.ESP,
		Log:     log,
	})
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		return err
	}
	notify := func(state string) {
		if _, err := daemon.SdNotify(false, state); err != nil {
			log.Warn("sd_notify", "ERROR", err.Error())
		}
	}
	notify(daemon.SdNotifyReady + "\nSTATUS=idle")
	log.Info("berthd ready", "BERTH_SYSROOT", opts.Sysroot, "BERTH_IDLE_TIMEOUT", opts.IdleTimeout.String())

	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	lastStatus := "idle"
	for {
		select {
		case <-ctx.Done():
			notify(daemon.SdNotifyStopping + "\nSTATUS=stopping")
			srv.Close()
			return nil
		case <-tick.C:
		}
		status := "idle"
		if j := srv.ActiveJob(); j != nil {
			in := j.info()
			status = fmt.Sprintf("job %s (%s): %s", in.Path, in.Kind, in.Phase)
			if in.Total > 0 {
				status += fmt.Sprintf(" %d/%d", in.Done, in.Total)
			}
		}
		if status != lastStatus {
			notify("STATUS=" + status)
			lastStatus = status
		}
		if opts.IdleTimeout > 0 && srv.IdleFor() > opts.IdleTimeout {
			log.Info("exiting after being idle", "BERTH_IDLE_TIMEOUT", opts.IdleTimeout.String())
			notify(daemon.SdNotifyStopping + "\nSTATUS=exiting, idle")
			srv.Close()
			return nil
		}
	}
}

// NewLogHandler logs to the journal with structured fields (attribute
// keys become journal fields: BERTH_JOB=..., ERROR=...) when journald is
// there, and as text to stderr otherwise.
func NewLogHandler(ident string) slog.Handler {
	if journal.Enabled() {
		return &journalHandler{ident: ident}
	}
	return slog.NewTextHandler(os.Stderr, nil)
}

type journalHandler struct {
	ident string
	attrs []slog.Attr
}

func (h *journalHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelInfo }

func (h *journalHandler) Handle(_ context.Context, r slog.Record) error {
	vars := map[string]string{"SYSLOG_IDENTIFIER": h.ident}
	add := func(a slog.Attr) {
		if k := journalField(a.Key); k != "" {
			vars[k] = a.Value.String()
		}
	}
	for _, a := range h.attrs {
		add(a)
	}
	r.Attrs(func(a slog.Attr) bool { add(a); return true })
	pri := journal.PriInfo
	switch {
	case r.Level >= slog.LevelError:
		pri = journal.PriErr
	case r.Level >= slog.LevelWarn:
		pri = journal.PriWarning
	}
	return journal.Send(r.Message, pri, vars)
}

func (h *journalHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &journalHandler{ident: h.ident, attrs: append(append([]slog.Attr{}, h.attrs...), as...)}
}

func (h *journalHandler) WithGroup(string) slog.Handler { return h }

// journalField makes a valid journal field name: upper case letters,
// digits and underscores, not starting with an underscore.
func journalField(k string) string {
	var b strings.Builder
	for _, c := range strings.ToUpper(k) {
		if (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' {
			b.WriteRune(c)
		} else {
			b.WriteByte('_')
		}
	}
	return strings.TrimLeft(b.String(), "_0123456789")
}
