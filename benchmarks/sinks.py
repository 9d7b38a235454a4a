"""Store sinks benchmark: the 500k small-record repo (``generate_cached(500000, profile="small")``,
~158 MB) backfilled into each sink, next to a naive baseline for each.

Runs (each a fresh process; records/s over the backfill call, peak RSS from ``os.wait4``):

- ``duckdb``, ``parquet``, ``postgresql``, ``jsonl``: :func:`repo_stream.backfill.backfill` with
  ``open_sink("duckdb:FILE" / "parquet:DIR" / "postgresql:DSN" / "jsonl:DIR")``, one memory worker,
  a 1 GiB memory limit (the walk stays in memory);
- ``naive-duckdb``, ``naive-postgresql``: the same walk, a sink that inserts row by row
  (``executemany`` of ``INSERT ... VALUES (?, ...)`` with ``json.dumps(record_json(block))``), in
  one transaction; on the first ``--naive-records`` records (default 50,000: row by row is slow);
- ``naive-lines``: the same walk, a sink writing ``json.dumps`` lines of ``record_json`` values
  (the files baseline).

PostgreSQL is a server started here (initdb + pg_ctl, Unix socket in a temporary folder, fsync off,
like the tests' one). Usage: ``python benchmarks/sinks.py [--runs duckdb,naive-duckdb,...]``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import aclosing
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ["duckdb", "naive-duckdb", "parquet", "jsonl", "naive-lines", "postgresql", "naive-postgresql"]


class Stop(Exception):
    pass


class NaiveSink:
    """Row-by-row inserts (``executemany``) or ``json.dumps`` lines; stops after ``limit`` records."""

    def __init__(self, kind: str, target: str, limit: int) -> None:
        self.kind, self.target, self.limit, self.count = kind, target, limit, 0
        self.conn: Any = None
        self.file: Any = None

    async def __call__(self, source: str, commit: Any, items: list[Any]) -> None:
        from repo_stream.records.values import record_json

        rows = [(commit.did, *k.split("/", 1), c, commit.rev, json.dumps(record_json(v), ensure_ascii=False)) for k, c, v in items]
        if self.kind == "naive-lines":
            if self.file is None:
                self.file = open(self.target, "w", encoding="utf-8")
            self.file.writelines(json.dumps({"key": k, "cid": c, "value": record_json(v)}, ensure_ascii=False) + "\n" for k, c, v in items)
        elif self.kind == "naive-duckdb":
            import duckdb

            if self.conn is None:
                self.conn = duckdb.connect(self.target)
                self.conn.execute("CREATE TABLE records (did VARCHAR, collection VARCHAR, rkey VARCHAR, cid VARCHAR, rev VARCHAR, value JSON, PRIMARY KEY (did, collection, rkey))")
                self.conn.execute("BEGIN")
            self.conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)", rows)
        else:
            import psycopg

            if self.conn is None:
                self.conn = psycopg.connect(self.target)
                self.conn.execute("CREATE TABLE records (did text, collection text, rkey text, cid text, rev text, value jsonb, PRIMARY KEY (did, collection, rkey))")
            with self.conn.cursor() as cur:
                cur.executemany("INSERT INTO records VALUES (%s, %s, %s, %s, %s, %s)", rows)
        self.count += len(items)
        if self.count >= self.limit:
            self.close()
            raise Stop

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.conn is not None:
            self.conn.commit() if self.kind == "naive-postgresql" else self.conn.execute("COMMIT")
            self.conn.close()
            self.conn = None


def child(kind: str, car: str, target: str, limit: int) -> None:
    import anyio

    from repo_stream.backfill import backfill, open_sink

    sink: Any = NaiveSink(kind, target, limit) if kind.startswith("naive") else open_sink(target)

    async def run() -> int:
        async with aclosing(backfill([car], sink=sink, memory_workers=1, mem_limit_mb=1024)) as results:
            out = [r async for r in results]
        if out[0].error is not None and "Stop" not in out[0].error:
            raise SystemExit(f"{kind}: {out[0].error}")
        return sink.count if kind.startswith("naive") else out[0].records

    started = time.perf_counter()
    records = anyio.run(run)
    seconds = time.perf_counter() - started
    close = getattr(sink, "close", None)
    if close is not None:
        close()
    print(json.dumps({"records": records, "seconds": seconds}))


def start_postgres(base: str) -> tuple[str, Any]:
    bindir = os.path.dirname(os.path.realpath(shutil.which("initdb") or sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1]))
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    data = os.path.join(base, "data")
    subprocess.run([os.path.join(bindir, "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"], user=user, check=True, capture_output=True)
    pg_ctl = os.path.join(bindir, "pg_ctl")
    subprocess.run([pg_ctl, "-D", data, "-o", f"-k {base} -c listen_addresses='' -F", "-l", os.path.join(base, "log"), "-w", "start"], user=user, check=True, capture_output=True)

    def stop() -> None:
        subprocess.run([pg_ctl, "-D", data, "-m", "immediate", "stop"], user=user, capture_output=True, check=False)

    return f"host={base} user=postgres dbname=postgres", stop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--naive-records", type=int, default=50_000)
    parser.add_argument("--child", nargs=4, metavar=("KIND", "CAR", "TARGET", "LIMIT"))
    args = parser.parse_args()
    if args.child:
        kind, car, target, limit = args.child
        child(kind, car, target, int(limit))
        return
    from repo_stream.records.generate import generate_cached

    car = str(generate_cached(500000, profile="small"))
    base = tempfile.mkdtemp(prefix="repo-stream-sinks-")
    stop = None
    try:
        runs = args.runs.split(",")
        dsn = None
        if any("postgresql" in r for r in runs):
            dsn, stop = start_postgres(base)
        print(f"{'run':18} {'records':>8} {'seconds':>8} {'records/s':>10} {'peak RSS MB':>12}")
        for run in runs:
            import psycopg

            if "postgresql" in run:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("DROP TABLE IF EXISTS records, repos")
            target = {
                "duckdb": f"duckdb:{base}/s.duckdb", "naive-duckdb": f"{base}/n.duckdb", "parquet": f"parquet:{base}/pq",
                "jsonl": f"jsonl:{base}/jl", "naive-lines": f"{base}/n.jsonl", "postgresql": f"postgresql:{dsn}", "naive-postgresql": str(dsn),
            }[run]  # fmt: skip
            proc = subprocess.Popen([sys.executable, __file__, "--child", run, car, target, str(args.naive_records)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
            assert proc.stdout is not None
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                print(f"{run:18} failed ({status})")
                continue
            result = json.loads(out)
            rate = result["records"] / result["seconds"]
            print(f"{run:18} {result['records']:>8} {result['seconds']:>8.2f} {rate:>10,.0f} {usage.ru_maxrss / 1024:>12.0f}", flush=True)
    finally:
        if stop is not None:
            stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
