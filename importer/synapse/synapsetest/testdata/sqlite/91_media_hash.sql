-- Synapse delta 91/01_media_hash.sql (the columns; its background index
-- updates are left out).
ALTER TABLE local_media_repository ADD COLUMN sha256 TEXT;
ALTER TABLE remote_media_cache ADD COLUMN sha256 TEXT;
