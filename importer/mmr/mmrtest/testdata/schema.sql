-- The tables of matrix-media-repo's database that an import reads, in the
-- shape its migrations (1 to 29) leave them; written for these tests from
-- the migrations' facts (columns, types, defaults, indexes). Tables an
-- import does not read (url_previews, background_tasks, exports, ...) are
-- left out.

CREATE TABLE media (
	origin TEXT NOT NULL,
	media_id TEXT NOT NULL,
	upload_name TEXT NOT NULL,
	content_type TEXT NOT NULL,
	user_id TEXT NOT NULL,
	sha256_hash TEXT NOT NULL,
	size_bytes BIGINT NOT NULL,
	location TEXT NOT NULL,
	creation_ts BIGINT NOT NULL,
	quarantined BOOL NOT NULL DEFAULT FALSE,
	datastore_id TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX media_index ON media (media_id, origin);
CREATE INDEX idx_sha256_hash_media ON media (sha256_hash);
CREATE INDEX idx_origin_media ON media (origin);
CREATE INDEX idx_origin_user_id_media ON media (origin, user_id);
CREATE INDEX idx_user_id_media ON media (user_id);
CREATE INDEX idx_datastore_id_location_media ON media (datastore_id, location);
CREATE INDEX idx_datastore_id_media ON media (datastore_id);

CREATE TABLE thumbnails (
	origin TEXT NOT NULL,
	media_id TEXT NOT NULL,
	width INT NOT NULL,
	height INT NOT NULL,
	method TEXT NOT NULL,
	content_type TEXT NOT NULL,
	size_bytes BIGINT NOT NULL,
	location TEXT NOT NULL,
	creation_ts BIGINT NOT NULL,
	animated BOOL NOT NULL DEFAULT FALSE,
	sha256_hash TEXT NOT NULL,
	datastore_id TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX thumbnails_index ON thumbnails (media_id, origin, width, height, method, animated);

-- Before matrix-media-repo 1.3 the repository named its datastores here;
-- since then the configuration's ids are used directly.
CREATE TABLE datastores (
	datastore_id TEXT NOT NULL,
	ds_type TEXT NOT NULL,
	uri TEXT NOT NULL
);
CREATE UNIQUE INDEX datastores_index ON datastores (datastore_id);

-- purpose is 'none' or 'pinned'.
CREATE TABLE media_attributes (
	origin TEXT NOT NULL,
	media_id TEXT NOT NULL,
	purpose TEXT NOT NULL
);
CREATE UNIQUE INDEX idx_media_attributes ON media_attributes (media_id, origin);

-- Kept up to date by a trigger on media in matrix-media-repo; the tests
-- fill it themselves.
CREATE TABLE user_stats (
	user_id TEXT PRIMARY KEY NOT NULL,
	uploaded_bytes BIGINT NOT NULL
);
