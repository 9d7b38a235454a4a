"""Record values and building repos: the ready block processors and the atproto JSON form
(:mod:`.values`: :func:`record_json`, :func:`decode_record`, :data:`JSON_CODEC`, ...), the
canonical repo CAR writer (:mod:`.writer`) and generated repos for tests and benchmarks
(:mod:`.generate`).

May import: :mod:`repo_stream.errors`, :mod:`repo_stream.core`.
"""

from .values import JSON_CODEC, MAX_DEPTH, RECORD_CODEC, JsonValue, Link, RecordValue, decode_record, record_json, to_json_value

__all__ = [
    "JSON_CODEC",
    "MAX_DEPTH",
    "RECORD_CODEC",
    "JsonValue",
    "Link",
    "RecordValue",
    "decode_record",
    "record_json",
    "to_json_value",
]
