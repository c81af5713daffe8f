"""The S3-compatible gateway: ``chunkfs gateway`` serves the filesystem over
S3's HTTP API (a bucket is a directory at the root, an object key the path
below it), through the same filesystem core as the FUSE mount.
"""
