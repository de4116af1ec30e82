package store

// SharedDir is one directory shared by all deployments: state/<Name> is
// bound over /<Name> at boot (DESIGN §5).
type SharedDir struct {
	Name string // directory below state/ and below the image root
	Perm uint32 // mode when the image does not have it
}

// SharedDirs are the directories shared by all deployments. deploy seeds
// them, berth-init binds them, and local-changes commands leave them alone:
// all three read this one list.
var SharedDirs = []SharedDir{
	{Name: "var", Perm: 0o755},
	{Name: "home", Perm: 0o755},
	{Name: "root", Perm: 0o700},
	{Name: "srv", Perm: 0o755},
}

// SharedNames returns the names of SharedDirs.
func SharedNames() []string {
	n := make([]string, len(SharedDirs))
	for i, s := range SharedDirs {
		n[i] = s.Name
	}
	return n
}

// PerDeployment are the paths below shared directories that stay with each
// deployment: package databases, which must match the image's /usr.
var PerDeployment = []string{"var/lib/dpkg", "var/lib/rpm", "var/lib/pacman"}
