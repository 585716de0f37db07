"""Storage: every URI through fsspec (fs.py: filesystems, URIs, retries of transient errors) and one
record's media bytes fetched with limits (fetch.py). Imports nothing of mmembed."""
