"""Ratios of a few percent, measured in interleaved pairs: the targets the
per-round benches cannot settle on a noisy machine.

    .venv/bin/python bench/paired.py [--sections metrics,uvloop,tls,newconn]
                                     [--blocks N] [--pairs 16] [--json-out PATH]

On this 2-core shared VM the machine's speed moves by 10-20% from one second
to the next (the same stack under the same load: 7.1k then 12.0k req/s two
seconds apart).  A round of a few seconds per stack, one stack after the
other, can only see differences far larger than that.  Here both stacks run
at once, and wrk loads them in turn for 1 s each, A B then B A: each pair's
ratio B/A compares two seconds of the same machine.  The stacks are started
afresh for every block (in alternating order), so that what one start
happens to get (cores, memory layout) averages out over the blocks.

Each block's figure is the median of its pairs' ratios, and the blocks are
the rounds of bench/performance.py's rule: the median over the blocks, and
its confidence interval from their order (distribution-free, at least 95%
with 6 blocks or more).  Pairs of one block share their stacks, so they are
not independent: an interval over the pairs, or a bootstrap over as few
blocks, comes out too narrow (two identical stacks, 8 blocks: a bootstrap
interval of 1.004-1.022).  Met / NOT met only when the interval lies wholly
on one side of the target.

Sections (each with its own target, from the issue that set it):

* ``same``: two identical stacks (2 workers, shared mode), keep-alive: the
  method's own calibration, not in the default sections.  The ratio should
  come out at 1 with an interval around it; how wide that interval is, is
  what this machine lets the other sections resolve.
* ``metrics``: 2 workers, shared mode, fdserver ``--metrics`` on (B) against
  off (A), keep-alive and a new connection per request.  Target: on / off
  >= 0.97 (the cost of metrics <= 3%).
* ``uvloop``: ``fdapp --loop uvloop`` in shared mode (B) against tornado's
  ``fork_processes(2)`` (A), keep-alive.  Target >= 1.15.
* ``tls``: shared mode with ``--certfile`` (B) against ``fork_processes(2)``
  with the same SSLContext (A), keep-alive and a new connection (a handshake)
  per request.  Target >= 1.
* ``newconn``: shared mode (B) against ``fork_processes(2)`` (A), plain HTTP,
  a new connection per request.  Target >= 1.05.

Every pair also checks that no request failed.  A block of 16 pairs takes
about 40 s on 2 cores; the default 40 blocks for metrics (its target is the
narrowest: 20 blocks resolve about +-2% here, not enough for a cost of about
1.5% against 3%) and 8 for the others make about 75 minutes for the default
sections.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loadgen import run_wrk
from performance import interval_verdict, make_certificate, median_interval, num, table
from stacks import FdStack, ForkedStack

PAIR_SECONDS = 1                # wrk's shortest run
CONNECTIONS = 32                # as bench/performance.py's throughput section
MIN_BLOCKS = 6                  # fewer: an interval of under 95%, and no verdict


class Section:
    """Two stacks to compare, the patterns, and the target for B / A."""

    def __init__(self, name: str, a: str, b: str, make_a: Callable, make_b: Callable,
                 patterns: list[str], target: float | None, scheme: str = "http",
                 blocks: int = 8) -> None:
        self.name, self.a, self.b = name, a, b
        self.blocks = blocks          # unless --blocks says otherwise
        self.make_a, self.make_b = make_a, make_b
        self.patterns, self.target, self.scheme = patterns, target, scheme


def sections(workdir: Path) -> dict[str, Section]:
    tls: tuple[str, str] | None = None

    def certificate() -> tuple[str, str]:
        nonlocal tls
        if tls is None:
            tls = make_certificate(workdir)
        return tls

    metrics = ("--metrics", "127.0.0.1:0")
    return {
        "same": Section(
            "same", "fdserver shared", "fdserver shared, another stack",
            lambda: FdStack(workdir, "same-a", 2),
            lambda: FdStack(workdir, "same-b", 2),
            ["keep-alive"], None),
        "metrics": Section(
            "metrics", "metrics off", "metrics on",
            lambda: FdStack(workdir, "metrics-off", 2),
            lambda: FdStack(workdir, "metrics-on", 2, metrics),
            ["keep-alive", "new conn"], 0.97, blocks=40),
        "uvloop": Section(
            "uvloop", "tornado fork_processes(2)", "fdserver shared, fdapp --loop uvloop",
            lambda: ForkedStack(2),
            lambda: FdStack(workdir, "uvloop", 2, (), ("--loop", "uvloop")),
            ["keep-alive"], 1.15),
        "tls": Section(
            "tls", "tornado fork_processes(2), same ssl_options",
            "fdserver shared, --certfile",
            lambda: ForkedStack(2, tls=certificate()),
            lambda: FdStack(workdir, "tls", 2, tls=certificate()),
            ["keep-alive", "new conn"], 1.0, scheme="https"),
        "newconn": Section(
            "newconn", "tornado fork_processes(2)", "fdserver shared",
            lambda: ForkedStack(2),
            lambda: FdStack(workdir, "newconn", 2),
            ["new conn"], 1.05),
    }


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def one_second(stack, pattern: str, scheme: str) -> dict:
    result = run_wrk(stack.address, connections=CONNECTIONS, threads=2,
                     duration=PAIR_SECONDS, new_connection=pattern == "new conn",
                     scheme=scheme)
    strangers = set(result.per_pid) - set(stack.worker_pids)
    if strangers:
        raise RuntimeError(f"responses from pids {sorted(strangers)}, not workers of the stack")
    return {"rps": result.rps, "errors": result.error_count + result.unmatched}


def run_section(section: Section, pattern: str, blocks: int, pairs: int) -> list[dict]:
    """blocks x pairs of (A, B) measurements, B / A per pair."""
    rows = []
    for block in range(blocks):
        stacks = [section.make_a(), section.make_b()]
        try:
            for stack in (stacks if block % 2 == 0 else stacks[::-1]):
                stack.start()
            for stack in stacks:                    # warm both up, not measured
                one_second(stack, pattern, section.scheme)
            for i in range(pairs):
                got: dict[int, dict] = {}
                for k in ((0, 1) if (i + block) % 2 == 0 else (1, 0)):
                    got[k] = one_second(stacks[k], pattern, section.scheme)
                rows.append({"section": section.name, "pattern": pattern, "block": block + 1,
                             "pair": i + 1, "a_rps": got[0]["rps"], "b_rps": got[1]["rps"],
                             "errors": got[0]["errors"] + got[1]["errors"]})
        finally:
            for stack in stacks:
                stack.close()
        mine = [r["b_rps"] / r["a_rps"] for r in rows if r["block"] == block + 1]
        log(f"{section.name} {pattern} block {block + 1}/{blocks}: median B/A "
            f"{statistics.median(mine):.3f} of {len(mine)} pairs")
    return rows


def block_interval(by_block: list[list[float]]) -> tuple[float, float, float]:
    """(median, low, high) of the blocks' medians: each block is one round of
    bench/performance.py's rule, the interval the order statistics that cover
    the median with at least 95% (fewer blocks: the lowest and highest)."""
    medians = [statistics.median(block) for block in by_block]
    low, high, _ = median_interval(medians)
    return statistics.median(medians), low, high


def verdict(low: float, high: float, target: float, blocks: int) -> str:
    if blocks < MIN_BLOCKS:
        return f"no verdict: {blocks} blocks (CI {low:.3f}-{high:.3f})"
    return interval_verdict(low, high, target, num(3))


def report(all_rows: list[dict], chosen: list[Section], pairs: int) -> str:
    out = [("section", "pattern", "A", "B", "A req/s", "B req/s", "B / A", "target", "",
            "blocks", "failed")]
    for section in chosen:
        for pattern in section.patterns:
            rows = [r for r in all_rows if r["section"] == section.name
                    and r["pattern"] == pattern]
            if not rows:
                continue
            by_block = [[r["b_rps"] / r["a_rps"] for r in rows if r["block"] == b]
                        for b in sorted({r["block"] for r in rows})]
            mid, low, high = block_interval(by_block)
            out.append((section.name, pattern, section.a, section.b,
                        num(0)(statistics.median(r["a_rps"] for r in rows)),
                        num(0)(statistics.median(r["b_rps"] for r in rows)),
                        f"{mid:.3f}",
                        "(1 expected)" if section.target is None else f">= {section.target:g}",
                        f"CI {low:.3f}-{high:.3f}" if section.target is None
                        else verdict(low, high, section.target, len(by_block)),
                        str(len(by_block)), str(sum(r["errors"] for r in rows))))
    return (f"Paired ratios: blocks (stacks started afresh) of {pairs} pairs of 1 s wrk -t 2 "
            f"-c {CONNECTIONS} runs, A then B or B then A; B / A: the median of the blocks' "
            "medians\n"
            + table(out) + "\nmet / NOT met: the interval (CI, from the order of the blocks' "
            f"medians) lies wholly above / below the target;\nunclear: it straddles the "
            f"target; no verdict with fewer than {MIN_BLOCKS} blocks.\n"
            "req/s: medians of the 1 s runs.  failed: wrk's errors and responses without a "
            "worker's pid, both stacks.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="metrics,uvloop,tls,newconn")
    p.add_argument("--blocks", type=int,
                   help="blocks of every section (default: 40 for metrics, 8 for the others)")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if (args.blocks is not None and args.blocks < 2) or args.pairs < 1:
        p.error("--blocks must be at least 2 and --pairs at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="fdserver-paired-"))
    known = sections(workdir)
    names = args.sections.split(",")
    if set(names) - set(known):
        p.error(f"--sections: a subset of {','.join(known)}, not {args.sections}")
    chosen = [known[n] for n in names]
    began = time.monotonic()
    rows: list[dict] = []
    for section in chosen:
        for pattern in section.patterns:
            rows += run_section(section, pattern, args.blocks or section.blocks, args.pairs)
    print(report(rows, chosen, args.pairs))
    print(f"({time.monotonic() - began:.0f}s)")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    failed = sum(r["errors"] for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
