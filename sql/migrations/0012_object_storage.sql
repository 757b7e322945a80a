-- 0012: audio in object storage (s3://bucket/key and other fsspec URLs; qwen_tasks.ingest.sources).
-- An object's path is its URL; size_bytes and mtime_ns hold the listing's size and last-modified time,
-- and `etag` its entity tag, so an unchanged object (same ETag, size and last-modified) is neither
-- downloaded nor hashed again by the next ingest. NULL for local files.
-- depends: 0006_lossless_paths_and_rechecks
ALTER TABLE audio_file ADD COLUMN etag text;
