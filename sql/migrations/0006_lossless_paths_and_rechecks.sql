-- 0006: file names that are not UTF-8 stored losslessly, what labelling re-checks before it reads a file,
-- and a fingerprint that lets a re-ingest of an unchanged manifest skip its lines without rewriting them.
-- depends: 0001_initial

-- The exact name as bytes when it is not valid UTF-8 (PostgreSQL text cannot hold it); `path` then holds
-- a readable form with each undecodable byte as \xNN. NULL for every UTF-8 name (`path` is exact then).
ALTER TABLE audio_file ADD COLUMN path_bytes bytea;
-- The allowed root (a real path) that admitted the file at its latest ingest. Labelling refuses a file
-- whose real location, resolved again when it is opened, is no longer under it.
ALTER TABLE audio_file ADD COLUMN root text;

-- A 64-bit BLAKE2b digest of the line as written (UTF-8). Ingest compares it to skip identical lines.
ALTER TABLE manifest_item ADD COLUMN line_hash bigint;
