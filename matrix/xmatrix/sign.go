package xmatrix

import (
	"crypto/ed25519"
	"encoding/base64"
	"fmt"
)

// withoutSignatures returns a shallow copy of obj without the "signatures"
// and "unsigned" keys, the part of an object that signatures cover.
func withoutSignatures(obj map[string]any) map[string]any {
	c := make(map[string]any, len(obj))
	for k, v := range obj {
		if k == "signatures" || k == "unsigned" {
			continue
		}
		c[k] = v
	}
	return c
}

// SignJSON signs obj with key on behalf of serverName, as described in the
// specification's "Signing JSON": the canonical JSON of obj without its
// "signatures" and "unsigned" members is signed and the unpadded base64
// signature stored at obj["signatures"][serverName][key.ID], keeping any
// other signatures already present.
func SignJSON(obj map[string]any, serverName string, key SigningKey) error {
	if len(key.Private) != ed25519.PrivateKeySize {
		return fmt.Errorf("signing JSON: private key of %s is %d bytes, want %d", key.ID, len(key.Private), ed25519.PrivateKeySize)
	}
	msg, err := Canonical(withoutSignatures(obj))
	if err != nil {
		return fmt.Errorf("signing JSON: %w", err)
	}
	sig := base64.RawStdEncoding.EncodeToString(ed25519.Sign(key.Private, msg))

	sigs, ok := obj["signatures"].(map[string]any)
	if !ok {
		if obj["signatures"] != nil {
			return fmt.Errorf("signing JSON: signatures is a %T, not an object", obj["signatures"])
		}
		sigs = map[string]any{}
	}
	server, ok := sigs[serverName].(map[string]any)
	if !ok {
		if sigs[serverName] != nil {
			return fmt.Errorf("signing JSON: signatures[%q] is a %T, not an object", serverName, sigs[serverName])
		}
		server = map[string]any{}
	}
	server[key.ID] = sig
	sigs[serverName] = server
	obj["signatures"] = sigs
	return nil
}

// VerifyJSON checks that obj carries a valid signature by serverName with
// key keyID, made with pub. Every failure (no such signature, malformed
// base64, object not canonicalizable, wrong signature) wraps
// ErrBadSignature.
func VerifyJSON(obj map[string]any, serverName, keyID string, pub ed25519.PublicKey) error {
	if len(pub) != ed25519.PublicKeySize {
		return fmt.Errorf("verifying JSON signature: %w: public key is %d bytes, want %d", ErrBadSignature, len(pub), ed25519.PublicKeySize)
	}
	sigs, _ := obj["signatures"].(map[string]any)
	server, _ := sigs[serverName].(map[string]any)
	sigB64, ok := server[keyID].(string)
	if !ok {
		return fmt.Errorf("verifying JSON signature: %w: no signature by %s with %s", ErrBadSignature, serverName, keyID)
	}
	sig, err := decodeBase64(sigB64)
	if err != nil || len(sig) != ed25519.SignatureSize {
		return fmt.Errorf("verifying JSON signature: %w: signature by %s with %s is not %d bytes of base64", ErrBadSignature, serverName, keyID, ed25519.SignatureSize)
	}
	msg, err := Canonical(withoutSignatures(obj))
	if err != nil {
		return fmt.Errorf("verifying JSON signature: %w: %w", ErrBadSignature, err)
	}
	if !ed25519.Verify(pub, msg, sig) {
		return fmt.Errorf("verifying JSON signature: %w: signature by %s with %s does not match", ErrBadSignature, serverName, keyID)
	}
	return nil
}

// requestObject builds the JSON object an X-Matrix signature covers. content
// is the raw JSON body, or nil/empty when the request has none (the
// "content" member is then omitted).
func requestObject(method, uri, origin, destination string, content []byte) (map[string]any, error) {
	obj := map[string]any{
		"method":      method,
		"uri":         uri,
		"origin":      origin,
		"destination": destination,
	}
	if len(content) > 0 {
		v, err := decodeStrict(content)
		if err != nil {
			return nil, fmt.Errorf("decoding request body as JSON: %w", err)
		}
		obj["content"] = v
	}
	return obj, nil
}

// SignRequest signs a federation request and returns the full value of its
// Authorization header:
//
//	X-Matrix origin="…",destination="…",key="ed25519:…",sig="…"
//
// method is the upper-case HTTP method, uri the request target exactly as
// sent (path and query, no scheme or host), origin and destination the
// server names before delegation, content the JSON body or nil for none.
func SignRequest(method, uri, origin, destination string, content []byte, key SigningKey) (string, error) {
	obj, err := requestObject(method, uri, origin, destination, content)
	if err != nil {
		return "", fmt.Errorf("signing request: %w", err)
	}
	if err := SignJSON(obj, origin, key); err != nil {
		return "", fmt.Errorf("signing request: %w", err)
	}
	sig := obj["signatures"].(map[string]any)[origin].(map[string]any)[key.ID].(string)
	return Auth{Origin: origin, Destination: destination, KeyID: key.ID, Signature: sig}.String(), nil
}
