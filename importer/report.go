package importer

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// MaxProblems is how many problems a Report lists; further ones are only
// counted (Report.MoreProblems).
const MaxProblems = 1000

// Counts counts items by what happened to them. Every item a source listed
// and Run finished is counted exactly once.
type Counts struct {
	// Imported items were stored (in a dry run: would be).
	Imported int64
	// AlreadyPresent items were stored before, with the same content.
	AlreadyPresent int64
	// Missing items have a row at the source but no bytes.
	Missing int64
	// Mismatched items' bytes did not match the source's recorded SHA-256
	// or size.
	Mismatched int64
	// Conflicts are IDs the target holds with other content, pending, or
	// deleted.
	Conflicts int64
	// Invalid items have an ID or recorded hash the module does not
	// accept (see ValidateItem).
	Invalid int64
	// Failed items hit any other error (reading the source, writing the
	// target).
	Failed int64
}

// Total is the number of items counted.
func (c Counts) Total() int64 {
	return c.Imported + c.AlreadyPresent + c.Missing + c.Mismatched + c.Conflicts + c.Invalid + c.Failed
}

// ProblemKind classifies an item that was not imported.
type ProblemKind string

// Problem kinds, one per counter of Counts but Imported and AlreadyPresent.
const (
	ProblemMissing  ProblemKind = "missing"
	ProblemMismatch ProblemKind = "mismatch"
	ProblemConflict ProblemKind = "conflict"
	ProblemInvalid  ProblemKind = "invalid"
	ProblemFailed   ProblemKind = "failed"
)

// problemKind maps an item's error to its kind: the importer's sentinel
// errors to their kinds, anything else to ProblemFailed.
func problemKind(err error) ProblemKind {
	switch {
	case errors.Is(err, ErrMissing):
		return ProblemMissing
	case errors.Is(err, ErrHashMismatch):
		return ProblemMismatch
	case errors.Is(err, ErrConflict):
		return ProblemConflict
	case errors.Is(err, ErrInvalid):
		return ProblemInvalid
	default:
		return ProblemFailed
	}
}

// count adds one item of kind k to c.
func (c *Counts) count(k ProblemKind) {
	switch k {
	case ProblemMissing:
		c.Missing++
	case ProblemMismatch:
		c.Mismatched++
	case ProblemConflict:
		c.Conflicts++
	case ProblemInvalid:
		c.Invalid++
	default:
		c.Failed++
	}
}

// Problem is one item that was not imported, and why.
type Problem struct {
	// Ref names the item.
	Ref storage.MediaRef
	// Kind classifies the problem.
	Kind ProblemKind
	// Error is the error's text.
	Error string
}

// Report is the outcome of a Run.
type Report struct {
	// Source is the source's Name.
	Source string
	// DryRun is true when nothing was written.
	DryRun bool
	// Totals is what the source announced.
	Totals Totals
	// Counts counts the items finished.
	Counts
	// ImportedBytes is the size of the imported items (in a dry run: of
	// those that would be).
	ImportedBytes int64
	// Problems lists the first MaxProblems items that were not imported;
	// MoreProblems counts the others.
	Problems     []Problem
	MoreProblems int64
	// Elapsed is how long the run took.
	Elapsed time.Duration
	// ReadByTarget counts the items whose bytes the target read from the
	// source's files itself (see FileSink).
	ReadByTarget int64
	// StreamedBecause is why a FileSink could not read the source's files
	// itself, after which the bytes were sent; empty when it never refused.
	StreamedBecause string
}

// OK reports whether nothing went wrong that needs the operator: no hash
// mismatch, no conflict and no failure. Missing source files and invalid
// IDs are reported but cannot be helped by running again.
func (r Report) OK() bool {
	return r.Mismatched == 0 && r.Conflicts == 0 && r.Failed == 0
}

// String formats the report for people: the counts, then every listed
// problem on a line of its own.
func (r Report) String() string {
	var b strings.Builder
	verb, imported := "imported", "imported"
	if r.DryRun {
		verb, imported = "checked (dry run, nothing written)", "would import"
	}
	fmt.Fprintf(&b, "%s %d items from %s in %s\n", verb, r.Total(), r.Source, r.Elapsed.Round(time.Millisecond))
	rows := []struct {
		label string
		n     int64
		extra string
	}{
		{imported, r.Imported, " (" + humanize.IBytes(uint64(max(r.ImportedBytes, 0))) + ")"},
		{"already present", r.AlreadyPresent, ""},
		{"missing at the source", r.Missing, ""},
		{"hash mismatches", r.Mismatched, ""},
		{"conflicts", r.Conflicts, ""},
		{"invalid", r.Invalid, ""},
		{"failed", r.Failed, ""},
	}
	for _, row := range rows {
		fmt.Fprintf(&b, "  %-22s %d%s\n", row.label+":", row.n, row.extra)
	}
	if r.ReadByTarget > 0 {
		fmt.Fprintf(&b, "  %d items were read by the target from the source's files directly\n", r.ReadByTarget)
	}
	if r.StreamedBecause != "" {
		fmt.Fprintf(&b, "  bytes were sent to the target, which could not read the source's files: %s\n", r.StreamedBecause)
	}
	if len(r.Problems) > 0 {
		fmt.Fprintf(&b, "problems:\n")
		for _, p := range r.Problems {
			fmt.Fprintf(&b, "  %-8s mxc://%s/%s: %s\n", p.Kind, p.Ref.ServerName, p.Ref.MediaID, p.Error)
		}
		if r.MoreProblems > 0 {
			fmt.Fprintf(&b, "  ... and %d more\n", r.MoreProblems)
		}
	}
	return b.String()
}

// Progress is a snapshot of a running import, given to Options.Progress.
type Progress struct {
	// Source is the source's Name.
	Source string
	// Totals is what the source announced (-1: unknown).
	Totals Totals
	// Counts counts the items finished so far.
	Counts
	// Bytes counts the bytes read from the source so far, plus the recorded
	// sizes of items finished without reading them (already present,
	// missing).
	Bytes int64
	// Elapsed is the time since the run started.
	Elapsed time.Duration
	// Final is true for the last snapshot, taken when the run ended.
	Final bool
}

// Fraction is how much of the source is done, from 0 to 1: by bytes when
// the source announced its size, else by items; ok is false when it
// announced neither.
func (p Progress) Fraction() (f float64, ok bool) {
	switch {
	case p.Totals.Bytes > 0:
		f = float64(p.Bytes) / float64(p.Totals.Bytes)
	case p.Totals.Items > 0:
		f = float64(p.Total()) / float64(p.Totals.Items)
	case p.Totals.Items == 0 || p.Final:
		return 1, true
	default:
		return 0, false
	}
	return min(max(f, 0), 1), true
}

// ETA estimates the time left at the rate so far; ok is false when there
// is nothing to estimate from yet.
func (p Progress) ETA() (eta time.Duration, ok bool) {
	f, ok := p.Fraction()
	if !ok || f <= 0 || p.Elapsed <= 0 {
		return 0, false
	}
	if f >= 1 {
		return 0, true
	}
	return time.Duration(float64(p.Elapsed) * (1 - f) / f), true
}
