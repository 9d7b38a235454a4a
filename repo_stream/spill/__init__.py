"""The spill store: an SQLite file that holds a repo's blocks when they pass the memory limit
(:mod:`.store`: :class:`DiskBuilder`, :class:`DiskStore`).

May import: :mod:`repo_stream.errors`, :mod:`repo_stream.core`.
"""

from .store import CBOR_CODEC, Codec, DiskBuilder, DiskStore

__all__ = ["CBOR_CODEC", "Codec", "DiskBuilder", "DiskStore"]
