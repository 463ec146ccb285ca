package mediaapi

import (
	"bytes"
	"errors"
	"io"
	"slices"
	"testing"
	"testing/iotest"
)

// recordingWriter keeps what it is given and the size of every write; it
// fails every write from the failAt-th on (1-based; 0: never).
type recordingWriter struct {
	buf    bytes.Buffer
	writes []int
	failAt int
}

var errWriter = errors.New("writer failed")

func (w *recordingWriter) Write(p []byte) (int, error) {
	w.writes = append(w.writes, len(p))
	if w.failAt > 0 && len(w.writes) >= w.failAt {
		return 0, errWriter
	}
	return w.buf.Write(p)
}

// TestRelayRemote: the remote body goes whole to the store and to the
// client in chunks read in full (one store write and one client write per
// chunk, also when the body arrives a byte at a time and with the last byte
// held back); a body that fails midway, or a store that fails, ends the relay
// with that error; a client that fails does not stop the store.
func TestRelayRemote(t *testing.T) {
	content := bytes.Repeat([]byte("0123456789abcdef"), 40) // 640 bytes
	errBody := errors.New("remote cut")
	const chunk = 100 // the relay buffer is chunk+1 bytes
	for _, tc := range []struct {
		name        string
		body        io.Reader
		holdBack    bool
		storeFailAt int
		clientFail  int
		wantErr     error
		wantStore   []byte
		wantClient  []byte
		// wantWrites is the client writes wanted, one per chunk.
		wantWrites []int
	}{
		{
			name: "whole", body: bytes.NewReader(content),
			wantStore: content, wantClient: content,
			wantWrites: []int{100, 100, 100, 100, 100, 100, 40},
		},
		{
			name: "a byte at a time", body: iotest.OneByteReader(bytes.NewReader(content)),
			wantStore: content, wantClient: content,
			wantWrites: []int{100, 100, 100, 100, 100, 100, 40},
		},
		{
			name: "data with EOF", body: iotest.DataErrReader(bytes.NewReader(content)),
			wantStore: content, wantClient: content,
			wantWrites: []int{100, 100, 100, 100, 100, 100, 40},
		},
		{
			// The held-back byte goes out with the next chunk, in the
			// same write; the last one only on release.
			name: "held back, a byte at a time", body: iotest.OneByteReader(bytes.NewReader(content)), holdBack: true,
			wantStore: content, wantClient: content[:len(content)-1],
			wantWrites: []int{99, 100, 100, 100, 100, 100, 40},
		},
		{
			name: "body fails midway", body: io.MultiReader(bytes.NewReader(content[:250]), iotest.ErrReader(errBody)),
			wantErr: errBody, wantStore: content[:250], wantClient: content[:250],
			wantWrites: []int{100, 100, 50},
		},
		{
			name: "store fails", body: bytes.NewReader(content), storeFailAt: 2,
			wantErr: errWriter, wantStore: content[:100], wantClient: content[:100],
			wantWrites: []int{100},
		},
		{
			name: "client fails, the store goes on", body: bytes.NewReader(content), clientFail: 2,
			wantStore: content, wantClient: content[:100],
			wantWrites: []int{100, 100},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := &recordingWriter{failAt: tc.storeFailAt}
			client := &recordingWriter{failAt: tc.clientFail}
			tee := &clientTee{w: client, holdBack: tc.holdBack}
			err := relayRemote(tc.body, store, tee, make([]byte, chunk+1))
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil && err != nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if !bytes.Equal(store.buf.Bytes(), tc.wantStore) {
				t.Errorf("store got %d bytes, want %d", store.buf.Len(), len(tc.wantStore))
			}
			if !bytes.Equal(client.buf.Bytes(), tc.wantClient) {
				t.Errorf("client got %d bytes %q, want %d", client.buf.Len(), client.buf.Bytes(), len(tc.wantClient))
			}
			if !slices.Equal(client.writes, tc.wantWrites) {
				t.Errorf("client writes %v, want %v", client.writes, tc.wantWrites)
			}
			if tc.holdBack {
				tee.release()
				if !bytes.Equal(client.buf.Bytes(), content) || tee.n != int64(len(content)) {
					t.Errorf("after release the client has %d bytes (counted %d), want %d", client.buf.Len(), tee.n, len(content))
				}
			}
		})
	}
}
