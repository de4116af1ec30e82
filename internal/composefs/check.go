package composefs

import (
	"fmt"
)

// Check parses the image at path completely and verifies its structure:
// magic numbers, superblock, inode and data bounds, xattr bounds, directory
// entries (".", "..", strict name order, file types, no cycles), link
// counts and the inode count. It does not verify fs-verity digests.
func Check(path string) error {
	im, err := OpenImage(path)
	if err != nil {
		return fmt.Errorf("check composefs image: %w", err)
	}
	if err := im.Check(); err != nil {
		return fmt.Errorf("check composefs image %s: %w", path, err)
	}
	return nil
}

// Check verifies the structure of the image (see the package function Check).
func (im *Image) Check() error {
	bs := im.blksz()
	if uint64(im.blocks)*bs > uint64(len(im.data)) {
		return corrupt("superblock says %d blocks, the image has %d bytes", im.blocks, len(im.data))
	}
	if im.version >= 0 && uint64(len(im.data))%bs != 0 {
		return corrupt("composefs image size %d is not a multiple of the block size", len(im.data))
	}
	if uint64(im.metaBlkaddr)*bs >= uint64(len(im.data)) {
		return corrupt("metadata block address %d beyond the image", im.metaBlkaddr)
	}
	if uint64(im.xattrBlk)*bs > uint64(len(im.data)) {
		return corrupt("xattr block address %d beyond the image", im.xattrBlk)
	}
	r := newTreeReader(im, true)
	root, err := r.read(im.rootNid, im.rootNid, "/", 0)
	if err != nil {
		return err
	}
	if !root.IsDir() {
		return corrupt("root inode %d is not a directory", im.rootNid)
	}
	for _, nid := range r.order {
		links, ok := r.links[nid]
		if ri := r.raw[nid]; ok && ri.nlink != links {
			return corrupt("inode %d: nlink %d, but %d directory entries point to it", nid, ri.nlink, links)
		}
	}
	if total := uint64(len(r.order)); total != im.inos {
		return corrupt("superblock counts %d inodes, the tree has %d", im.inos, total)
	}
	inos := map[uint32]uint64{}
	for _, nid := range r.order {
		ri := r.raw[nid]
		if ri.mode&SIFMT == SIFREG {
			if ri.layout == layoutChunkBased {
				if _, _, err := im.chunks(ri); err != nil {
					return err
				}
			}
		}
		if other, dup := inos[ri.ino]; dup && im.version >= 0 {
			return corrupt("inodes %d and %d share inode number %d", nid, other, ri.ino)
		}
		inos[ri.ino] = nid
	}
	return nil
}

// checkDirents verifies one directory's entries: "." and ".." point to
// the directory and its parent, and names are unique and in strict
// bytewise order (the kernel looks names up by binary search).
func checkDirents(ents []dirent, self, parent uint64) error {
	var dot, dotdot bool
	for i, e := range ents {
		if i > 0 && ents[i-1].name >= e.name {
			return corrupt("directory entries out of order: %q before %q", ents[i-1].name, e.name)
		}
		switch e.name {
		case ".":
			if e.nid != self {
				return corrupt(`"." points to inode %d, not the directory %d`, e.nid, self)
			}
			dot = true
		case "..":
			if e.nid != parent {
				return corrupt(`".." points to inode %d, not the parent %d`, e.nid, parent)
			}
			dotdot = true
		}
	}
	if !dot || !dotdot {
		return corrupt(`directory lacks "." or ".."`)
	}
	return nil
}

// erofsFileType is the dirent file type for a mode (EROFS_FT_*).
func erofsFileType(mode uint32) uint8 {
	switch mode & SIFMT {
	case SIFREG:
		return 1
	case SIFDIR:
		return 2
	case SIFCHR:
		return 3
	case SIFBLK:
		return 4
	case SIFIFO:
		return 5
	case SIFSOCK:
		return 6
	case SIFLNK:
		return 7
	}
	return 0
}
