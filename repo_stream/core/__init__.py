"""The repo format and the hot path: CAR framing, DAG-CBOR, CIDs, MST rules, the block table,
the walker, the signed commit, and the seam that picks the C core or the pure-Python reference.

Modules: :mod:`.cid` (CID bytes and text), :mod:`.dagcbor` (strict DAG-CBOR decoding),
:mod:`.mst` (key syntax and layers), :mod:`.messages` (the errors both implementations raise),
:mod:`.car` (the sans-IO CAR parser and its async pump), :mod:`.blocks` (the in-memory block
table and spill rows), :mod:`.runs` (the spill store's sorted runs), :mod:`.walk` (the MST
walker), :mod:`.commit` (the commit object, its encoding and signature check) and
:mod:`.implementation` (which implementation runs).

May import: :mod:`repo_stream.errors`, :mod:`repo_stream.crypto`, ``repo_stream._native``.
Nothing here does I/O beyond reading a byte source it is given. Internal: the public names are
re-exported from :mod:`repo_stream`.
"""
