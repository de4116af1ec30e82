package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/godbus/dbus/v5"
)

// Client talks to berthd.
type Client struct {
	conn    *dbus.Conn
	signals chan *dbus.Signal
}

// ErrNoDaemon is returned by Connect when berthd is neither running nor
// bus-activatable (the CLI then works on the sysroot directly).
var ErrNoDaemon = errors.New("berthd is not available on the system bus")

// Connect connects to the system bus (address "" ) or to address, and
// checks that org.berth1 is running or activatable.
func Connect(address string) (*Client, error) {
	var conn *dbus.Conn
	var err error
	if address == "" {
		conn, err = dbus.ConnectSystemBus()
	} else {
		conn, err = dbus.Connect(address)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoDaemon, err)
	}
	c := &Client{conn: conn}
	var has bool
	if err := conn.BusObject().Call("org.freedesktop.DBus.NameHasOwner", 0, BusName).Store(&has); err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: %w", ErrNoDaemon, err)
	}
	if !has {
		var names []string
		if err := conn.BusObject().Call("org.freedesktop.DBus.ListActivatableNames", 0).Store(&names); err != nil || !slices.Contains(names, BusName) {
			conn.Close()
			return nil, ErrNoDaemon
		}
	}
	// Subscribe before any job starts, so that no signal of it is missed.
	if err := conn.AddMatchSignal(dbus.WithMatchInterface(JobInterface), dbus.WithMatchSender(BusName)); err != nil {
		conn.Close()
		return nil, fmt.Errorf("subscribe to job signals: %w", err)
	}
	c.signals = make(chan *dbus.Signal, 256)
	conn.Signal(c.signals)
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

func (c *Client) manager() dbus.BusObject { return c.conn.Object(BusName, ManagerPath) }

// Status returns GetStatus's document.
func (c *Client) Status() (*Host, []byte, error) {
	var s string
	if err := c.manager().Call(ManagerInterface+".GetStatus", 0).Store(&s); err != nil {
		return nil, nil, fmt.Errorf("GetStatus: %w", err)
	}
	var h Host
	if err := json.Unmarshal([]byte(s), &h); err != nil {
		return nil, nil, fmt.Errorf("GetStatus: parse: %w", err)
	}
	return &h, []byte(s), nil
}

// Upgrade starts an upgrade job.
func (c *Client) Upgrade(opts map[string]dbus.Variant) (dbus.ObjectPath, error) {
	return c.startJob("Upgrade", opts)
}

// Switch starts a switch job.
func (c *Client) Switch(ref string, opts map[string]dbus.Variant) (dbus.ObjectPath, error) {
	return c.startJob("Switch", ref, opts)
}

// Rollback starts a rollback job.
func (c *Client) Rollback(opts map[string]dbus.Variant) (dbus.ObjectPath, error) {
	return c.startJob("Rollback", opts)
}

// Cleanup starts a cleanup job.
func (c *Client) Cleanup(opts map[string]dbus.Variant) (dbus.ObjectPath, error) {
	return c.startJob("Cleanup", opts)
}

// Pin pins or unpins a deployment.
func (c *Client) Pin(id string, pinned bool) error {
	return c.manager().Call(ManagerInterface+".Pin", 0, id, pinned).Err
}

// Diff returns the local changes of a deployment as JSON.
func (c *Client) Diff(id string) (string, error) {
	var s string
	err := c.manager().Call(ManagerInterface+".Diff", 0, id).Store(&s)
	return s, err
}

func (c *Client) startJob(method string, args ...any) (dbus.ObjectPath, error) {
	if m, ok := args[len(args)-1].(map[string]dbus.Variant); ok && m == nil {
		args[len(args)-1] = map[string]dbus.Variant{}
	}
	var p dbus.ObjectPath
	if err := c.manager().Call(ManagerInterface+"."+method, 0, args...).Store(&p); err != nil {
		return "", err
	}
	return p, nil
}

// Cancel cancels a job.
func (c *Client) Cancel(job dbus.ObjectPath) error {
	return c.conn.Object(BusName, job).Call(JobInterface+".Cancel", 0).Err
}

// JobResult is how a job ended.
type JobResult struct {
	State   string // done, failed, cancelled
	Summary string
	Error   string
}

// Wait follows job until it finishes, calling onProgress for each
// Progress signal. A job that already finished (its Finished signal came
// before the caller subscribed) is read from its properties.
func (c *Client) Wait(ctx context.Context, job dbus.ObjectPath, onProgress func(phase string, done, total uint64)) (*JobResult, error) {
	if r, err := c.jobResult(job); err != nil || r != nil {
		return r, err
	}
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case sig, ok := <-c.signals:
			if !ok {
				return nil, errors.New("connection to berthd closed")
			}
			if sig.Path != job {
				continue
			}
			switch sig.Name {
			case JobInterface + ".Progress":
				var phase string
				var done, total uint64
				if dbus.Store(sig.Body, &phase, &done, &total) == nil && onProgress != nil {
					onProgress(phase, done, total)
				}
			case JobInterface + ".Finished":
				r := &JobResult{}
				if err := dbus.Store(sig.Body, &r.State, &r.Error); err != nil {
					return nil, fmt.Errorf("job %s: bad Finished signal: %w", job, err)
				}
				if v, err := c.conn.Object(BusName, job).GetProperty(JobInterface + ".Summary"); err == nil {
					r.Summary, _ = v.Value().(string)
				}
				return r, nil
			}
		}
	}
}

// jobResult returns the result of a finished job, nil while it runs.
func (c *Client) jobResult(job dbus.ObjectPath) (*JobResult, error) {
	var props map[string]dbus.Variant
	err := c.conn.Object(BusName, job).Call("org.freedesktop.DBus.Properties.GetAll", 0, JobInterface).Store(&props)
	if err != nil {
		return nil, fmt.Errorf("job %s: %w", job, err)
	}
	st, _ := props["State"].Value().(string)
	if st == StateRunning || st == "" {
		return nil, nil
	}
	r := &JobResult{State: st}
	r.Summary, _ = props["Summary"].Value().(string)
	r.Error, _ = props["Error"].Value().(string)
	return r, nil
}
