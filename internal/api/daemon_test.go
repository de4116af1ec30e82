package api

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRunDaemonNotifiesAndExitsWhenIdle runs berthd's main loop on a
// private bus with a NOTIFY_SOCKET of our own: it must say READY=1 once
// it owns the name, and exit by itself after the idle timeout.
func TestRunDaemonNotifiesAndExitsWhenIdle(t *testing.T) {
	needRoot(t)
	bus := startBus(t, "")
	sysroot := newSysroot(t)
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)

	start := time.Now()
	done := make(chan error, 1)
	go func() {
		done <- RunDaemon(context.Background(), DaemonOptions{Address: bus.addr, Sysroot: sysroot, IdleTimeout: 2 * time.Second})
	}()
	buf := make([]byte, 4096)
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	n, _, err := conn.ReadFromUnix(buf)
	if err != nil {
		t.Fatalf("no sd_notify message: %v", err)
	}
	if msg := string(buf[:n]); !strings.Contains(msg, "READY=1") || !strings.Contains(msg, "STATUS=idle") {
		t.Fatalf("first notification %q", msg)
	}
	// Ready means the name is owned: a client finds berthd.
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatalf("after READY=1: %v", err)
	}
	if _, _, err := c.Status(); err != nil {
		t.Fatal(err)
	}
	c.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
		if el := time.Since(start); el < 2*time.Second {
			t.Fatalf("exited after %s, before the idle timeout", el)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("berthd did not exit when idle")
	}
	n, _, err = conn.ReadFromUnix(buf)
	if err != nil || !strings.Contains(string(buf[:n]), "STOPPING=1") {
		t.Fatalf("last notification %q, %v", buf[:n], err)
	}
}
