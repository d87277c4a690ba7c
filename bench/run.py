"""Every bench, one after the other: what ``./dev bench`` runs.

    .venv/bin/python bench/run.py [--rounds N] [--no-install] [--only NAMES]

1. bench/rolling_restart.py: failed requests and p99 latency during a
   rolling restart of 4 workers (ours, naive, gunicorn).
2. bench/performance.py: throughput against tornado's fork_processes,
   fdserver's CPU, fairness over 8 workers, start-up and handout times.
   Needs wrk (``./dev bench`` installs the Debian package).
3. bench/scale.py: balance and fdserver's CPU with 8, 64 and 256 workers,
   dispatch's keep-alive fairness, fdapp --loop uvloop against fork_processes,
   memory per worker, p99 latency during a rolling restart against steady,
   200 graceful restarts in a row of 64 workers.
4. bench/paired.py: the ratios of a few percent (the cost of --metrics,
   uvloop, HTTPS and a new connection per request against fork_processes),
   in interleaved pairs of 1 s runs; --rounds N sets its blocks.

The Python packages that only the benches use, gunicorn (the rolling-restart
comparison) and matplotlib (the fairness plot, bench/results/fairness.png),
are pip-installed into this interpreter's environment first unless
--no-install; without them the rolling-restart bench leaves gunicorn out and
the plot is skipped.  Tables go to stdout, progress to stderr.  A bench that
fails does not stop the next; the exit status is then 1.  The default rounds
take about an hour on 2 cores (--only scale: about 9 minutes; paired: about 75).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
EXTRAS = {"gunicorn": "gunicorn", "matplotlib": "matplotlib"}    # import name -> package


def missing_extras() -> list[str]:
    return [package for module, package in EXTRAS.items()
            if importlib.util.find_spec(module) is None]


def install(packages: list[str]) -> None:
    print(f"run.py: installing bench-only packages into {sys.prefix}: {' '.join(packages)}",
          file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", *packages],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        print(f"run.py: pip install failed (going on without them):\n{done.stderr.strip()}",
              file=sys.stderr, flush=True)


def run_bench(name: str, argv: list[str]) -> int:
    print(f"\n=== bench/{name} {' '.join(argv)}".rstrip(), flush=True)
    began = time.monotonic()
    try:
        code = subprocess.run([sys.executable, str(BENCH / name), *argv],
                              stdin=subprocess.DEVNULL).returncode
    except KeyboardInterrupt:
        # The bench got the SIGINT as well and killed its children on the way out.
        raise SystemExit(130) from None
    status = "ok" if code == 0 else f"FAILED (exit {code})"
    print(f"=== bench/{name}: {status} in {time.monotonic() - began:.0f}s", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, help="rounds for every bench (default: each its own)")
    p.add_argument("--no-install", action="store_true",
                   help="do not pip-install the bench-only packages (gunicorn, matplotlib)")
    p.add_argument("--only", default="rolling,performance,scale,paired",
                   help="comma-separated subset of %(default)s")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if only - {"rolling", "performance", "scale", "paired"}:
        p.error(f"--only: a subset of rolling,performance,scale,paired, not {args.only}")
    rounds = ["--rounds", str(args.rounds)] if args.rounds else []
    missing = missing_extras()
    if missing and not args.no_install:
        install(missing)
    rolling = list(rounds)
    if not (BIN / "gunicorn").exists():
        print("run.py: no gunicorn in this environment: the rolling-restart bench compares "
              "ours and naive only", file=sys.stderr, flush=True)
        rolling += ["--stacks", "ours,naive"]
    began = time.monotonic()
    benches = {"rolling": ("rolling_restart.py", rolling),
               "performance": ("performance.py", rounds), "scale": ("scale.py", rounds),
               "paired": ("paired.py", ["--blocks", str(args.rounds)] if args.rounds else [])}
    codes = [run_bench(*benches[name]) for name in benches if name in only]
    print(f"\nall benches: {time.monotonic() - began:.0f}s", flush=True)
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
