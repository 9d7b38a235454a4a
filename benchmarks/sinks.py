"""Store sinks benchmark: the 500k small-record repo (``generate_cached(500000, profile="small")``,
~158 MB) backfilled into each sink, next to a naive baseline for each.

Runs (each a fresh process; records/s over the backfill call, peak RSS from ``os.wait4``):

- ``duckdb``, ``parquet``, ``postgresql``, ``jsonl``: :func:`repo_stream.backfill.backfill` with
  ``open_sink("duckdb:FILE" / "parquet:DIR" / "postgresql:DSN" / "jsonl:DIR")``, one memory worker,
  a 1 GiB memory limit (the walk stays in memory);
- ``naive-duckdb``, ``naive-postgresql``: the same walk, a sink that inserts row by row
  (``executemany`` of ``INSERT ... VALUES (?, ...)`` with ``json.dumps(record_json(block))``), in
  one transaction; on the first ``--naive-records`` records (default 20,000: row by row is slow);
- ``naive-lines``: the same walk, a sink writing ``json.dumps`` lines of ``record_json`` values
  (the files baseline);
- ``duckdb-tuples``, ``parquet-tuples``, ``jsonl-tuples`` (only with ``--runs``): the sink fed
  tuple chunks (``sink(source, commit, items)``) instead of the walker's own batches
  (``write_batch``), the way before the batches;
- ``duckdb-fast``: ``DuckdbSink(compress=False)`` (DuckDB's string compression off: the commit
  of a large repo is mostly that compression);
- ``dump-duckdb``: ``repo-stream dump CAR --mem-limit-mb 1024 | python -c "duckdb ... CREATE
  TABLE records AS SELECT * FROM read_json_auto('/dev/stdin', columns={key, cid, value JSON})"``
  (the shell way into DuckDB, with no primary key; the columns are given because DuckDB's
  inference of ``value`` fails on the mixed record types); peak RSS is the larger of the two processes'.

``--set``: the same runs over the ~1,000-repo set of ``benchmarks/backfill.py`` (976 CARs of 10
to 100,000 small records, read from files, ~780k records), with the backfill's defaults (2 memory
workers, 64 MiB per repo: the largest repos spill); ``dump-duckdb`` is not run there.

Two rates: records over the backfill call (the CAR's load included), and "ingest": records over
the time from the sink's first records to the end (the walk and the sink; what the naive runs,
stopped after a part of the repo, are compared on).

Each run is repeated ``--repeat`` times (default 3), interleaved (run 1 of every kind, then run 2,
...) so that a noisy neighbour hits them alike; the table gives the median records/s, the spread
(min-max) and the median peak RSS, and each sink's ratio to its baseline (``duckdb`` and
``duckdb-fast`` to ``naive-duckdb`` and ``dump-duckdb``, ``parquet`` and ``jsonl`` to
``naive-lines``, ``postgresql`` to ``naive-postgresql``).

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
RUNS = ["duckdb", "duckdb-fast", "naive-duckdb", "dump-duckdb", "parquet", "jsonl", "naive-lines", "postgresql", "naive-postgresql"]
BASELINES = {
    "duckdb": ["naive-duckdb", "dump-duckdb"],
    "duckdb-fast": ["naive-duckdb", "dump-duckdb"],
    "parquet": ["naive-lines"],
    "jsonl": ["naive-lines"],
    "duckdb-tuples": ["naive-duckdb"],
    "parquet-tuples": ["naive-lines"],
    "jsonl-tuples": ["naive-lines"],
    "postgresql": ["naive-postgresql"],
}


class Stop(Exception):
    pass


class NaiveSink:
    """Row-by-row inserts (``executemany``) or ``json.dumps`` lines; stops after ``limit`` records."""

    def __init__(self, kind: str, target: str, limit: int) -> None:
        self.kind, self.target, self.limit, self.count = kind, target, limit, 0
        self.conn: Any = None
        self.file: Any = None
        # Imported here, as a script would at its top: not in the timed part (the sinks do the same).
        from repo_stream.records.values import record_json  # noqa: F401

        if kind == "naive-duckdb":
            import duckdb  # noqa: F401
        elif kind == "naive-postgresql":
            import psycopg  # noqa: F401

    async def __call__(self, source: str, commit: Any, items: list[Any]) -> None:
        if self.count >= self.limit:
            raise Stop
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

    tuples = kind.endswith("-tuples") or bool(os.environ.get("SINKS_TUPLES"))
    kind = kind.removesuffix("-tuples")

    from repo_stream.backfill import backfill, open_sink

    if kind.startswith("naive"):
        sink: Any = NaiveSink(kind, target, limit)
    elif kind == "duckdb-fast":
        from repo_stream.backfill import DuckdbSink

        sink = DuckdbSink(target.removeprefix("duckdb:"), compress=False)
    else:
        sink = open_sink(target)

    first: list[float] = []

    class Timed:
        """The sink, noting when its first records came (the CAR's load is before)."""

        keyed_by_did = getattr(sink, "keyed_by_did", False)

        async def __call__(self, source: str, commit: Any, items: list[Any]) -> None:
            if not first:
                first.append(time.perf_counter())
            await sink(source, commit, items)

        async def finish(self, source: str, commit: Any, error: BaseException | None) -> None:
            finish = getattr(sink, "finish", None)
            if finish is not None:
                await finish(source, commit, error)

    class TimedBatches(Timed):
        """The same, for a sink that takes the walker's Arrow batches (``write_batch``)."""

        batch_values = getattr(sink, "batch_values", None)
        batch_rows = getattr(sink, "batch_rows", 65536)
        batch_block_bytes = getattr(sink, "batch_block_bytes", False)

        async def write_batch(self, source: str, commit: Any, batch: Any, **kwargs: Any) -> None:
            if not first:
                first.append(time.perf_counter())
            await sink.write_batch(source, commit, batch, **kwargs)

    timed = TimedBatches() if getattr(sink, "batch_values", None) and not tuples else Timed()

    if car.endswith(".txt"):  # the repo set: its CARs, the backfill's defaults (2 memory workers, 64 MiB per repo)
        sources = open(car).read().split()
        options: dict[str, Any] = {}
    else:
        sources, options = [car], {"memory_workers": 1, "mem_limit_mb": 1024}

    async def run() -> int:
        records = 0
        async with aclosing(backfill(sources, sink=timed, **options)) as results:
            async for result in results:
                if result.error is not None and "Stop" not in result.error:
                    raise SystemExit(f"{kind}: {result.source}: {result.error}")
                records += result.records if result.error is None else 0
                if isinstance(sink, NaiveSink) and sink.count >= sink.limit:
                    break
        return sink.count if isinstance(sink, NaiveSink) else records

    started = time.perf_counter()
    records = anyio.run(run)
    ended = time.perf_counter()
    close = getattr(sink, "close", None)
    if close is not None:
        close()
    print(json.dumps({"records": records, "seconds": ended - started, "ingest_seconds": ended - first[0]}))


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


def run_once(run: str, car: str, base: str, dsn: str | None, naive_records: int) -> tuple[int, float, float, float, float] | None:
    """One run in fresh processes: (records, seconds of the backfill call, peak RSS MiB, CPU
    seconds of the processes (user + system, start-up included; the PostgreSQL server's not),
    seconds from the sink's first records to the end), or None if it failed. ``dump-duckdb``:
    the pipeline's wall time for both."""
    for leftover in glob.glob(os.path.join(base, "out-*")):
        shutil.rmtree(leftover, ignore_errors=True) if os.path.isdir(leftover) else os.remove(leftover)
    if "postgresql" in run:
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS records, repos, backfill_checkpoint, sync_cursor")
    if run == "dump-duckdb":
        started = time.perf_counter()
        dump = subprocess.Popen([sys.executable, "-m", "repo_stream", "dump", car, "--mem-limit-mb", "1024"], stdout=subprocess.PIPE, cwd=ROOT)
        load = subprocess.Popen(
            [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); c.execute('SET enable_progress_bar = false'); "
             "c.execute(\"CREATE TABLE records AS SELECT * FROM read_json_auto('/dev/stdin', "
             "columns={'key': 'VARCHAR', 'cid': 'VARCHAR', 'value': 'JSON'})\"); "
             "print(c.execute('SELECT count(*) FROM records').fetchone()[0])", f"{base}/out-dump.duckdb"],
            stdin=dump.stdout, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert dump.stdout is not None and load.stdout is not None
        dump.stdout.close()
        out = load.stdout.read()
        _, status1, usage1 = os.wait4(dump.pid, 0)
        _, status2, usage2 = os.wait4(load.pid, 0)
        seconds = time.perf_counter() - started
        if status1 or status2:
            return None
        cpu = usage1.ru_utime + usage1.ru_stime + usage2.ru_utime + usage2.ru_stime
        return int(out), seconds, max(usage1.ru_maxrss, usage2.ru_maxrss) / 1024, cpu, seconds
    target = {
        "duckdb": f"duckdb:{base}/out-s.duckdb", "duckdb-fast": f"duckdb:{base}/out-f.duckdb", "naive-duckdb": f"{base}/out-n.duckdb",
        "parquet": f"parquet:{base}/out-pq", "jsonl": f"jsonl:{base}/out-jl", "naive-lines": f"{base}/out-n.jsonl",
        "postgresql": f"postgresql:{dsn}", "naive-postgresql": str(dsn),
    }[run.removesuffix("-tuples")]  # fmt: skip
    proc = subprocess.Popen([sys.executable, __file__, "--child", run, car, target, str(naive_records)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        return None
    result = json.loads(out)
    return result["records"], result["seconds"], usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, result["ingest_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--naive-records", type=int, default=20_000)
    parser.add_argument("--set", action="store_true", help="the ~1,000-repo set of benchmarks/backfill.py instead of the 500k repo")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "CAR", "TARGET", "LIMIT"))
    args = parser.parse_args()
    if args.child:
        kind, car, target, limit = args.child
        child(kind, car, target, int(limit))
        return
    import signal
    import statistics

    from repo_stream.records.generate import generate_cached

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the PostgreSQL server on the way out

    base = tempfile.mkdtemp(prefix="repo-stream-sinks-")
    if args.set:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from backfill import prepare

        car = os.path.join(base, "repos.txt")
        with open(car, "w") as listing:
            listing.write("\n".join(prepare()["repos"].values()) + "\n")
    else:
        car = str(generate_cached(500000, profile="small"))
    stop = None
    try:
        runs = [r for r in args.runs.split(",") if not (args.set and r == "dump-duckdb")]
        dsn = None
        if any("postgresql" in r for r in runs):
            dsn, stop = start_postgres(base)
        measured: dict[str, list[tuple[int, float, float, float, float]]] = {run: [] for run in runs}
        for round_ in range(args.repeat):
            for run in runs:
                result = run_once(run, car, base, dsn, args.naive_records)
                if result is None:
                    print(f"{run}: failed", flush=True)
                    continue
                measured[run].append(result)
                print(
                    f"  round {round_ + 1} {run:18} {result[0]:>8} {result[1]:>8.2f} s {result[0] / result[1]:>10,.0f}/s "
                    f"{result[2]:>6.0f} MB {result[3]:>6.2f} CPU s {result[0] / result[4]:>10,.0f}/s ingest",
                    flush=True,
                )
        rates = {run: statistics.median(r / s for r, s, _, _, _ in got) for run, got in measured.items() if got}
        ingest = {run: statistics.median(r / i for r, _, _, _, i in got) for run, got in measured.items() if got}
        print(
            f"\n{'run':18} {'records':>8} {'median rec/s':>13} {'min-max rec/s':>20} {'ingest rec/s':>13} "
            f"{'peak RSS MB':>12} {'CPU s':>6}  ratios (ingest rec/s)"
        )
        for run, got in measured.items():
            if not got:
                continue
            each = sorted(r / s for r, s, _, _, _ in got)
            ratios = "  ".join(f"{ingest[run] / ingest[b]:.1f}x {b}" for b in BASELINES.get(run, []) if b in ingest)
            print(
                f"{run:18} {got[0][0]:>8} {rates[run]:>13,.0f} {f'{each[0]:,.0f}-{each[-1]:,.0f}':>20} {ingest[run]:>13,.0f} "
                f"{statistics.median(m for _, _, m, _, _ in got):>12.0f} {statistics.median(c for _, _, _, c, _ in got):>6.2f}  {ratios}"
            )
    finally:
        if stop is not None:
            stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
