"""Inputs: where records come from. discover.py turns --input (a manifest, a media tree, WebDataset
shards, PDFs) into an InputSpec; webdataset.py reads tar shards. Imports storage and schema only."""
