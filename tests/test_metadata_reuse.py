"""The header table of a data directory is read once: later stage calls pass a file count, not 874k header reads."""

from __future__ import annotations

import os

from src.data import metadata


def test_fresh_metadata_is_reused_without_reading_a_header(tiny_data, monkeypatch):
    first = metadata.load_metadata(tiny_data, "test", workers=1)

    def no_reads(path):
        raise AssertionError(f"header of {path} read again")

    monkeypatch.setattr(metadata, "read_header", no_reads)
    scanned = []
    real_scandir = os.scandir

    def counting_scandir(path):
        scanned.append(path)
        return real_scandir(path)

    monkeypatch.setattr(metadata.os, "scandir", counting_scandir)
    assert metadata.load_metadata(tiny_data, "test", workers=1).equals(first)
    assert len(scanned) == 1  # the freshness check: one directory listing
