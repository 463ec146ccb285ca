package mediaapi

import "github.com/caddy-matrix-media/caddy-matrix-media/matrix"

// checkContentType checks a Content-Type before it is stored, whoever
// supplied it (an uploader, a remote server), with matrix.ValidContentType,
// and says what is wrong with it.
func checkContentType(ct string) *matrix.Error {
	if len(ct) > matrix.MaxContentTypeLength {
		return matrix.InvalidParam("Content-Type is longer than 255 characters")
	}
	if !matrix.ValidContentType(ct) {
		return matrix.InvalidParam("Content-Type contains invalid characters")
	}
	return nil
}

// storedContentType is the Content-Type recorded for remote media: the
// remote's own when it passes checkContentType, else (or when there is none)
// application/octet-stream. The media is stored rather than refused: a
// client asked for these bytes and can still use them, while a label that
// would be refused at upload is replaced by the neutral type, which is only
// ever served as an attachment.
func storedContentType(ct string) string {
	if ct == "" || checkContentType(ct) != nil {
		return "application/octet-stream"
	}
	return ct
}
