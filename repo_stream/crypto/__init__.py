"""Keys and signatures: did:key parsing (:mod:`.didkey`) and atproto ECDSA signatures over
secp256k1 and P-256 (:mod:`.signature`).

May import: :mod:`repo_stream.errors` only.
"""
