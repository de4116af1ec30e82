package composefs

import "encoding/hex"

// PayloadPath returns the object path of a file with the given fs-verity
// digest relative to the object store: "xx/<rest of hex>".
func PayloadPath(digest []byte) string {
	h := hex.EncodeToString(digest)
	if len(h) < 2 {
		return h
	}
	return h[:2] + "/" + h[2:]
}
