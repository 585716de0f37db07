"""Outputs: what an output folder says about the runs that wrote it: the manifest (manifest.py), the
names a command owns (ownership.py), the lease, identity and resume accounting (runstate.py), and the
ids already committed (ids.py). Imports storage, models (device figures) and schema."""
