"""Moved to :mod:`sbmdbg.fixture.snapshot` (kept for old imports)."""
from sbmdbg.fixture.snapshot import SnapshotSymbols, load_snapshot  # noqa: F401
