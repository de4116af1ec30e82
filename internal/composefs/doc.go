// Package composefs is berth's composefs implementation: the tree model
// (tree.go: an Inode per file, hard links as shared Inodes), the image
// writer (writer*.go: EROFS images byte-identical to mkcomposefs 1.0.8 for
// the same tree and options), the reader (reader*.go, dump.go: parse an
// image back into a tree, mkcomposefs --print-digest-style dumps), scanning
// a directory into a tree (scan.go), the content-addressed object store
// that is every mount's data-only lower layer (store.go, payload.go), and
// the mount helper (mount_linux.go: EROFS on a loop device, then overlayfs
// with data-only lowers and verity=require).
//
// The on-disk format is in docs/on-disk-format.md; the byte-exact facts it
// follows are in the project's shared reference.
package composefs
