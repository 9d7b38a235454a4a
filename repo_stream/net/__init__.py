"""The network: DID and handle resolution (:mod:`.identity`), streaming ``getRepo`` over HTTP
(:mod:`.fetch`), per-host politeness of fetches (:mod:`.hosts`) and opening whatever SOURCE
string a user names (:mod:`.source`).

Public modules: :mod:`repo_stream.net.identity`, :mod:`repo_stream.net.fetch`,
:mod:`repo_stream.net.hosts`, :mod:`repo_stream.net.source`. httpx and dnspython are imported only when these are.

May import: :mod:`repo_stream.errors`.
"""
