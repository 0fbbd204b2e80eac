"""Bytes on disk: atomic writes, one content-addressed store, and the checkpoint layouts."""
