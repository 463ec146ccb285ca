package xmatrix

import (
	"encoding/base64"
	"errors"
	"testing"
)

// Test vectors from xmatrix-vectors.txt / the specification's
// "Cryptographic Test Vectors".
const (
	testSeed      = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"
	testPublic    = "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"
	testServer    = "domain"
	testKeyID     = "ed25519:1"
	testDest      = "media.example.org"
	downloadURI   = "/_matrix/federation/v1/media/download/abc123?timeout_ms=20000"
	downloadSig   = "rIsu5NwSqcaN3X3g6frvcyHM1qhRyGo7xqYVThhJ942B3aULroa3/oZyP0WVAY8oPZRgQLr3NaygxvBRNafTAA"
	thumbnailURI  = "/_matrix/federation/v1/media/thumbnail/abc123?width=32&height=32&method=scale"
	thumbnailSig  = "hLNrfntTN5xgwpMcDs0+ow8NZV3C6COTPRSvPDyDcMRttE1ATSsgnl8ZbRPxgwNRIQZ2XQ2hM/sYRVOn9535Cw"
	keyServerJSON = `{"server_name":"domain","valid_until_ts":1700000000000,
 "verify_keys":{"ed25519:1":{"key":"XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"}},
 "old_verify_keys":{},
 "signatures":{"domain":{"ed25519:1":"ewq/uPhfAzmWSa/3PRlr5Q0W59jG75Wtb6mzxIELuVRAxYMHOeMFue6fNXijZkIwLLembQ0+gl7DIkiUGcoUBg"}}}`
	keyServerSig = "ewq/uPhfAzmWSa/3PRlr5Q0W59jG75Wtb6mzxIELuVRAxYMHOeMFue6fNXijZkIwLLembQ0+gl7DIkiUGcoUBg"
)

// testKey returns the specification's test signing key.
func testKey(t testing.TB) SigningKey {
	t.Helper()
	keys, err := ParseSynapseKey([]byte("ed25519 1 " + testSeed + "\n"))
	if err != nil {
		t.Fatalf("parsing the test key: %v", err)
	}
	return keys[0]
}

func TestTestKeyPublic(t *testing.T) {
	k := testKey(t)
	if got := k.PublicBase64(); got != testPublic {
		t.Fatalf("public key %s, want %s", got, testPublic)
	}
	if got := base64.RawStdEncoding.EncodeToString(k.Public()); got != testPublic {
		t.Fatalf("Public() = %s", got)
	}
}

func TestSignJSONVectors(t *testing.T) {
	tests := []struct {
		name string
		obj  map[string]any
		want string
	}{
		{"empty", map[string]any{}, "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"},
		{"data", map[string]any{"one": 1, "two": "Two"}, "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"},
		// "signatures" and "unsigned" are not covered by the signature.
		{"ignores unsigned and other signatures", map[string]any{
			"one": 1, "two": "Two",
			"unsigned":   map[string]any{"age_ts": 1},
			"signatures": map[string]any{"other": map[string]any{"ed25519:x": "abc"}},
		}, "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"},
	}
	k := testKey(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := SignJSON(tt.obj, testServer, k); err != nil {
				t.Fatalf("SignJSON: %v", err)
			}
			sigs := tt.obj["signatures"].(map[string]any)
			got := sigs[testServer].(map[string]any)[testKeyID]
			if got != tt.want {
				t.Fatalf("signature %v, want %s", got, tt.want)
			}
			if other, ok := sigs["other"]; tt.name == "ignores unsigned and other signatures" && !ok {
				t.Fatalf("other signatures dropped: %v", other)
			}
			if err := VerifyJSON(tt.obj, testServer, testKeyID, k.Public()); err != nil {
				t.Fatalf("VerifyJSON: %v", err)
			}
		})
	}
}

func TestSignJSONRejectsBadSignaturesMember(t *testing.T) {
	k := testKey(t)
	if err := SignJSON(map[string]any{"signatures": "x"}, testServer, k); err == nil {
		t.Fatal("signatures of the wrong type accepted")
	}
	if err := SignJSON(map[string]any{"a": 1.5}, testServer, k); err == nil {
		t.Fatal("float accepted")
	}
	if err := SignJSON(map[string]any{}, testServer, SigningKey{ID: "ed25519:x"}); err == nil {
		t.Fatal("empty private key accepted")
	}
}

func TestVerifyJSONFailures(t *testing.T) {
	k := testKey(t)
	other, err := GenerateSigningKey(fixedReader(7))
	if err != nil {
		t.Fatal(err)
	}
	signed := func() map[string]any {
		obj := map[string]any{"one": 1, "two": "Two"}
		if err := SignJSON(obj, testServer, k); err != nil {
			t.Fatal(err)
		}
		return obj
	}
	tests := []struct {
		name   string
		mutate func(map[string]any)
		server string
		keyID  string
		pub    []byte
	}{
		{"tampered content", func(o map[string]any) { o["two"] = "Three" }, testServer, testKeyID, k.Public()},
		{"added member", func(o map[string]any) { o["three"] = 3 }, testServer, testKeyID, k.Public()},
		{"wrong public key", nil, testServer, testKeyID, other.Public()},
		{"wrong server", nil, "other", testKeyID, k.Public()},
		{"wrong key id", nil, testServer, "ed25519:2", k.Public()},
		{"short public key", nil, testServer, testKeyID, k.Public()[:16]},
		{"garbage signature", func(o map[string]any) {
			o["signatures"].(map[string]any)[testServer].(map[string]any)[testKeyID] = "!!!"
		}, testServer, testKeyID, k.Public()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			obj := signed()
			if tt.mutate != nil {
				tt.mutate(obj)
			}
			err := VerifyJSON(obj, tt.server, tt.keyID, tt.pub)
			if !errors.Is(err, ErrBadSignature) {
				t.Fatalf("VerifyJSON = %v, want ErrBadSignature", err)
			}
		})
	}
	// Unsigned members may change without breaking the signature.
	obj := signed()
	obj["unsigned"] = map[string]any{"x": 1}
	if err := VerifyJSON(obj, testServer, testKeyID, k.Public()); err != nil {
		t.Fatalf("unsigned change broke the signature: %v", err)
	}
}

func TestSignRequestVectors(t *testing.T) {
	tests := []struct {
		name, uri, wantBytes, wantHeader string
	}{
		{
			"download", downloadURI,
			`{"destination":"media.example.org","method":"GET","origin":"domain","uri":"/_matrix/federation/v1/media/download/abc123?timeout_ms=20000"}`,
			`X-Matrix origin="domain",destination="media.example.org",key="ed25519:1",sig="` + downloadSig + `"`,
		},
		{
			"thumbnail", thumbnailURI,
			`{"destination":"media.example.org","method":"GET","origin":"domain","uri":"/_matrix/federation/v1/media/thumbnail/abc123?width=32&height=32&method=scale"}`,
			`X-Matrix origin="domain",destination="media.example.org",key="ed25519:1",sig="` + thumbnailSig + `"`,
		},
	}
	k := testKey(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			obj, err := requestObject("GET", tt.uri, testServer, testDest, nil)
			if err != nil {
				t.Fatal(err)
			}
			msg, err := Canonical(obj)
			if err != nil || string(msg) != tt.wantBytes {
				t.Fatalf("signed bytes %s (%v)\nwant %s", msg, err, tt.wantBytes)
			}
			h, err := SignRequest("GET", tt.uri, testServer, testDest, nil, k)
			if err != nil {
				t.Fatalf("SignRequest: %v", err)
			}
			if h != tt.wantHeader {
				t.Fatalf("header\n%s\nwant\n%s", h, tt.wantHeader)
			}
		})
	}
}

func TestSignRequestWithContent(t *testing.T) {
	k := testKey(t)
	body := []byte(`{"b": [1, 2], "a": "x"}`)
	h, err := SignRequest("POST", "/_matrix/federation/v1/x", testServer, testDest, body, k)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ParseAuthorization(h)
	if err != nil {
		t.Fatal(err)
	}
	obj := map[string]any{
		"method": "POST", "uri": "/_matrix/federation/v1/x", "origin": testServer, "destination": testDest,
		"content":    map[string]any{"a": "x", "b": []any{1, 2}},
		"signatures": map[string]any{testServer: map[string]any{testKeyID: a.Signature}},
	}
	if err := VerifyJSON(obj, testServer, testKeyID, k.Public()); err != nil {
		t.Fatalf("content not covered as expected: %v", err)
	}
	if _, err := SignRequest("POST", "/x", testServer, testDest, []byte(`{"a":`), k); err == nil {
		t.Fatal("invalid JSON body accepted")
	}
}

func TestKeyServerVectorSignature(t *testing.T) {
	k := testKey(t)
	obj := map[string]any{
		"server_name":     "domain",
		"valid_until_ts":  int64(1700000000000),
		"verify_keys":     map[string]any{"ed25519:1": map[string]any{"key": testPublic}},
		"old_verify_keys": map[string]any{},
	}
	if err := SignJSON(obj, testServer, k); err != nil {
		t.Fatal(err)
	}
	if got := obj["signatures"].(map[string]any)[testServer].(map[string]any)[testKeyID]; got != keyServerSig {
		t.Fatalf("key/v2/server signature %v, want %s", got, keyServerSig)
	}
}
