package oci

import (
	"context"
	"fmt"
	"io"
	"strings"

	"go.podman.io/image/v5/docker/reference"
	"go.podman.io/image/v5/pkg/sysregistriesv2"
	"go.podman.io/image/v5/transports/alltransports"
	"go.podman.io/image/v5/types"
)

// shortName is how a short name (an image name without transport and
// registry, like "debian:trixie") resolved.
type shortName struct {
	candidates []string // fully qualified registry references, in the order to try
	how        string   // for messages: "alias in FILE", "unqualified-search registries of FILE"
}

// resolveShortName resolves ref the way podman does when it cannot prompt
// (containers-registries.conf(5), "Short-Name Aliasing"): a short-name
// alias wins; otherwise each unqualified-search registry is a candidate,
// except that short-name-mode "enforcing" refuses more than one (podman
// would ask on a terminal; berth never asks). It returns nil when ref is
// not a short name: it has a transport or names a registry.
//
// Aliases are never recorded: berth does not write the user's
// registries configuration.
func resolveShortName(sys *types.SystemContext, ref string) (*shortName, error) {
	return resolveShortNameMode(sys, ref, false)
}

// localShortNameCandidates is what a short name may have been recorded
// as by Pull, with the system's registries.conf; every search registry
// counts whatever the short-name mode (as podman's local lookup).
func localShortNameCandidates(ref string) []string {
	sn, err := resolveShortNameMode(nil, ref, true)
	if err != nil || sn == nil {
		return nil
	}
	return sn.candidates
}

func resolveShortNameMode(sys *types.SystemContext, ref string, local bool) (*shortName, error) {
	if alltransports.TransportFromImageName(ref) != nil || strings.Contains(ref, "://") {
		return nil, nil
	}
	parsed, err := reference.Parse(ref)
	if err != nil {
		return nil, nil // not a registry reference at all; parseRef says why
	}
	named, ok := parsed.(reference.Named)
	if !ok {
		return nil, nil
	}
	if d := reference.Domain(named); strings.ContainsAny(d, ".:") || d == "localhost" {
		return nil, nil // qualified
	}
	qualify := func(n reference.Named) (string, error) {
		var err error
		if t, ok := named.(reference.NamedTagged); ok {
			if n, err = reference.WithTag(n, t.Tag()); err != nil {
				return "", err
			}
		}
		if d, ok := named.(reference.Digested); ok {
			if n, err = reference.WithDigest(n, d.Digest()); err != nil {
				return "", err
			}
		}
		return reference.TagNameOnly(n).String(), nil
	}
	name := reference.TrimNamed(named).String()
	// containers/image caches registries.conf for the life of the
	// process; berthd lives long, and an edit must count at the next pull.
	sysregistriesv2.InvalidateCache()
	mode, err := sysregistriesv2.GetShortNameMode(sys)
	if err != nil {
		return nil, fmt.Errorf("resolve short name %q: %w", ref, err)
	}
	alias, origin, err := sysregistriesv2.ResolveShortNameAlias(sys, name)
	if err != nil {
		return nil, fmt.Errorf("resolve short name %q: %w", ref, err)
	}
	if alias != nil {
		c, err := qualify(alias)
		if err != nil {
			return nil, fmt.Errorf("resolve short name %q: alias %s: %w", ref, alias, err)
		}
		return &shortName{candidates: []string{c}, how: "short-name alias in " + origin}, nil
	}
	regs, origin, err := sysregistriesv2.UnqualifiedSearchRegistriesWithOrigin(sys)
	if err != nil {
		return nil, fmt.Errorf("resolve short name %q: %w", ref, err)
	}
	if len(regs) == 0 {
		where := "no registries.conf was found"
		if origin != "" {
			where = origin + " has no short-name alias for " + name + " and no unqualified-search-registries"
		}
		return nil, fmt.Errorf("%q is a short name and %s: give the registry (e.g. docker.io/library/%s, quay.io/...), or add an alias under [aliases] in registries.conf", ref, where, ref)
	}
	sn := &shortName{how: "unqualified-search registries of " + origin}
	for _, r := range regs {
		n, err := reference.ParseNormalizedNamed(r + "/" + name)
		if err != nil {
			return nil, fmt.Errorf("resolve short name %q with unqualified-search registry %q: %w", ref, r, err)
		}
		c, err := qualify(n)
		if err != nil {
			return nil, fmt.Errorf("resolve short name %q: %w", ref, err)
		}
		sn.candidates = append(sn.candidates, c)
	}
	if len(sn.candidates) > 1 && mode == types.ShortNameModeEnforcing && !local {
		return nil, fmt.Errorf("short name %q is ambiguous: it could be any of %s (%s), and short-name-mode is \"enforcing\"; berth does not prompt: give the full name, or add an alias under [aliases] in registries.conf",
			ref, strings.Join(sn.candidates, ", "), sn.how)
	}
	return sn, nil
}

// pullCandidate is one name Pull may fetch ref as.
type pullCandidate struct {
	name string // what the record's Ref becomes
	ref  types.ImageReference
}

// pullCandidates parses ref: a short name becomes the registry references
// it resolves to (said on warn), anything else itself.
func pullCandidates(sys *types.SystemContext, ref string, warn io.Writer) ([]pullCandidate, error) {
	sn, err := resolveShortName(sys, ref)
	if err != nil {
		return nil, err
	}
	if sn == nil {
		r, err := parseRef(ref)
		if err != nil {
			return nil, err
		}
		return []pullCandidate{{name: ref, ref: r}}, nil
	}
	var out []pullCandidate
	for _, c := range sn.candidates {
		r, err := alltransports.ParseImageName("docker://" + c)
		if err != nil {
			return nil, fmt.Errorf("short name %q resolved to %q: %w", ref, c, err)
		}
		out = append(out, pullCandidate{name: c, ref: r})
	}
	if len(out) == 1 {
		fmt.Fprintf(warn, "berth: resolved short name %q to %s (%s)\n", ref, out[0].name, sn.how)
	} else {
		fmt.Fprintf(warn, "berth: resolving short name %q with the %s: trying %s\n", ref, sn.how, strings.Join(sn.candidates, ", "))
	}
	return out, nil
}

// openFirst opens the first candidate that opens (podman's order for
// unqualified-search registries).
func openFirst(ctx context.Context, sys *types.SystemContext, ref string, cands []pullCandidate) (types.ImageSource, pullCandidate, error) {
	var errs []string
	for _, c := range cands {
		src, err := c.ref.NewImageSource(ctx, sys)
		if err == nil {
			return src, c, nil
		}
		if len(cands) == 1 {
			return nil, c, fmt.Errorf("open %s: %w", c.name, err)
		}
		errs = append(errs, fmt.Sprintf("%s: %v", c.name, err))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, pullCandidate{}, fmt.Errorf("open %s: no candidate could be opened:\n  %s", ref, strings.Join(errs, "\n  "))
}
