#!/usr/bin/env python3
"""Benchmark edge.waitgroup.WaitGroup: per-op overhead, I/O speedup, CPU-bound kinds.

B1  Overhead per no-op op (await asyncio.sleep(0)) against plain asyncio patterns.
    Goal: the group costs at most 2x a bare TaskGroup per op in every mode, and with
    a limit the live tasks never exceed limit + 1.
B2  Speedup of N ops that each wait L seconds, with limit k.
    Goal at L = 200 ms: speedup >= 0.9 x N / ceil(N / k), the reachable ceiling,
    which equals min(N, k) when k divides N.
B3  Four ~200 ms pure-Python ops on the machine's cores, by kind, with a loop-lag probe,
    then with op_timeout = 100 ms.
    Goal: process kind >= 1.3x faster than thread kind, and loop-lag p99 < 10 ms with
    process ops. With the timeout, worker CPU stops within 100 ms + kill grace per op.
    The run also reports how much faster a plain ProcessPoolExecutor is than one
    process, because a machine with busy cores cannot reach the 1.3x goal.

Run from the repository root:  .venv/bin/python scripts/bench_waitgroup.py [--quick]
Everything runs locally, and nothing touches the network.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import math
import multiprocessing
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.waitgroup import Outcome, WaitGroup

KILL_GRACE = 0.25

OpsRunner = Callable[[int], Coroutine[Any, Any, None]]


@dataclass
class Check:
    """One acceptance line of the final table."""

    name: str
    measured: str
    goal: str
    passed: bool


CHECKS: list[Check] = []


def check(name: str, measured: str, goal: str, passed: bool) -> None:
    CHECKS.append(Check(name, measured, goal, passed))


# --- B1: overhead per op ---------------------------------------------------


async def noop() -> None:
    await asyncio.sleep(0)


async def bare_task_group(ops: int) -> None:
    async with asyncio.TaskGroup() as group:
        for _ in range(ops):
            group.create_task(noop())


async def task_group_semaphore(ops: int) -> None:
    semaphore = asyncio.Semaphore(64)

    async def gated() -> None:
        async with semaphore:
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as group:
        for _ in range(ops):
            group.create_task(gated())


async def task_group_semaphore_timeout(ops: int) -> None:
    semaphore = asyncio.Semaphore(64)

    async def gated() -> None:
        async with semaphore, asyncio.timeout(10.0):
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as group:
        for _ in range(ops):
            group.create_task(gated())


async def spawn_gated(ops: int) -> None:
    semaphore = asyncio.Semaphore(64)

    def release(_: object) -> None:
        semaphore.release()

    async with asyncio.TaskGroup() as group:
        for _ in range(ops):
            await semaphore.acquire()
            group.create_task(noop()).add_done_callback(release)


def group_runner(limit: int | None, op_timeout: float | None) -> OpsRunner:
    async def run(ops: int) -> None:
        async with WaitGroup(limit, op_timeout=op_timeout) as wg:
            for _ in range(ops):
                await wg.go(noop)

    return run


B1_MODES: dict[str, OpsRunner] = {
    "TaskGroup (bare)": bare_task_group,
    "TaskGroup + Semaphore(64)": task_group_semaphore,
    "TaskGroup + Semaphore + timeout": task_group_semaphore_timeout,
    "spawn-gated Semaphore(64)": spawn_gated,
    "WaitGroup(None)": group_runner(None, None),
    "WaitGroup(64)": group_runner(64, None),
    "WaitGroup(64, op_timeout=10)": group_runner(64, 10.0),
}


async def peak_live_tasks(limit: int, ops: int) -> int:
    """Run ``ops`` no-op ops through WaitGroup(limit) and return the peak task count."""
    peak = 0

    async def probe() -> None:
        nonlocal peak
        peak = max(peak, len(asyncio.all_tasks()))
        await asyncio.sleep(0)

    async with WaitGroup(limit) as wg:
        for _ in range(ops):
            await wg.go(probe)
    return peak


def tracemalloc_peak(run: OpsRunner, ops: int) -> float:
    """Return the peak traced memory in KiB while ``run`` executes ``ops`` ops."""
    tracemalloc.start()
    try:
        asyncio.run(run(ops))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 1024


def bench_overhead(ops: int, repeats: int) -> None:
    print(f"\nB1  overhead per op, {ops} no-op ops, best of {repeats} (us/op)")
    best = dict.fromkeys(B1_MODES, math.inf)
    # Round-robin over the modes so that load changes on the machine hit all alike.
    for _ in range(repeats):
        for name, run in B1_MODES.items():
            start = time.perf_counter()
            asyncio.run(run(ops))
            best[name] = min(best[name], time.perf_counter() - start)
    bare = best["TaskGroup (bare)"] / ops * 1e6
    for name, seconds in best.items():
        per_op = seconds / ops * 1e6
        print(f"    {name:34s} {per_op:7.2f}  ({per_op / bare:4.2f}x bare)")
    for name in ("WaitGroup(None)", "WaitGroup(64)", "WaitGroup(64, op_timeout=10)"):
        per_op = best[name] / ops * 1e6
        check(
            f"B1 {name} per op",
            f"{per_op:.1f} us = {per_op / bare:.2f}x bare ({bare:.1f} us)",
            "<= 2x bare TaskGroup",
            per_op <= 2 * bare,
        )
    peak = asyncio.run(peak_live_tasks(64, ops))
    print(f"    peak live tasks, WaitGroup(64): {peak}")
    check("B1 peak live tasks, limit 64", str(peak), "<= limit + 1 = 65", peak <= 65)
    for name in ("TaskGroup (bare)", "spawn-gated Semaphore(64)", "WaitGroup(64)"):
        kib = tracemalloc_peak(B1_MODES[name], ops)
        print(f"    tracemalloc peak, {name}: {kib:,.0f} KiB")


# --- B2: I/O speedup -------------------------------------------------------


async def io_wall(ops: int, latency: float, limit: int) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with WaitGroup(limit) as wg:
        for _ in range(ops):
            await wg.go(asyncio.sleep, latency)
    if wg.stats().succeeded != ops:
        message = f"B2: {ops - wg.stats().succeeded} ops did not succeed"
        raise RuntimeError(message)
    return loop.time() - start


def bench_io(sizes: list[int], latencies: list[float]) -> None:
    print("\nB2  I/O speedup: N ops each waiting L, limit k (wall, ideal, overhead, speedup)")
    for latency in latencies:
        for ops in sizes:
            for limit in sorted({1, 4, ops}):
                wall = asyncio.run(io_wall(ops, latency, limit))
                ideal = math.ceil(ops / limit) * latency
                speedup = ops * latency / wall
                # min(N, k) is reachable only when k divides N: with rounds of k ops
                # the best possible speedup is N / ceil(N / k).
                ceiling = ops / math.ceil(ops / limit)
                print(
                    f"    L={latency * 1000:4.0f} ms N={ops:3d} k={limit:3d}"
                    f"  wall {wall * 1000:8.1f} ms  ideal {ideal * 1000:7.0f} ms"
                    f"  overhead {(wall - ideal) * 1000:6.1f} ms"
                    f"  speedup {speedup:6.2f} (ceiling {ceiling:.2f})"
                )
                if latency >= 0.2:
                    check(
                        f"B2 N={ops} k={limit} L=200ms speedup",
                        f"{speedup:.2f}",
                        f">= {0.9 * ceiling:.2f} (0.9 x N/ceil(N/k))",
                        speedup >= 0.9 * ceiling,
                    )


# --- B3: CPU-bound work by kind -------------------------------------------


def burn(iterations: int) -> int:
    """Pure-Python CPU work that holds the GIL throughout."""
    total = 0
    for value in range(iterations):
        total += value * value
    return total


async def burn_inline(iterations: int) -> int:
    """CPU work run directly on the event loop (the async-inline kind)."""
    return burn(iterations)


def idle(iterations: int) -> None:
    """Control op for the CPU measurement: waits without using CPU."""
    time.sleep(5.0)


def calibrate(target: float) -> int:
    """Return an iteration count for which burn() takes about ``target`` seconds here."""
    iterations = 200_000
    while True:
        start = time.perf_counter()
        burn(iterations)
        elapsed = time.perf_counter() - start
        if elapsed > 0.05:
            break
        iterations *= 2
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        burn(iterations)
        samples.append(time.perf_counter() - start)
    return int(iterations * target / statistics.median(samples))


class LagProbe:
    """Task that sleeps 1 ms in a loop and records how late each wake-up is."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            start = loop.time()
            await asyncio.sleep(0.001)
            self.lags.append(loop.time() - start - 0.001)

    def stop(self) -> None:
        self._stop.set()

    def percentile(self, fraction: float) -> float:
        if not self.lags:
            return 0.0
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class CpuRun:
    """Measurements of one B3 configuration, times in seconds from the first submission."""

    wall: float
    lag_p50: float
    lag_p99: float
    outcomes: dict[str, int]
    outcomes_final_at: float


async def wait_until_work_stopped(wg: WaitGroup) -> None:
    """Wait until no abandoned thread still occupies a slot."""
    while wg.stats().abandoned_in_flight:  # noqa: ASYNC110 - polls a counter, no event exists
        await asyncio.sleep(0.005)


async def cpu_run(
    kind: str,
    limit: int,
    iterations: int,
    ops: int,
    op_timeout: float | None,
    work: Callable[[int], object] = burn,
) -> CpuRun:
    loop = asyncio.get_running_loop()
    wg = WaitGroup(limit, op_timeout=op_timeout, kill_grace=KILL_GRACE, name=f"b3-{kind}")
    if kind == "process":
        # Start the workers first so that process start-up is not measured.
        warm = [await wg.go(os.getpid, kind="process") for _ in range(limit)]
        for handle in warm:
            await handle
    probe = LagProbe()
    async with asyncio.TaskGroup() as probes:
        probes.create_task(probe.run(), name="edge.bench.lag-probe")
        await asyncio.sleep(0.05)
        start = loop.time()
        for _ in range(ops):
            if kind == "async":
                await wg.go(burn_inline, iterations)
            elif kind == "thread":
                await wg.go(work, iterations, kind="thread")
            else:
                await wg.go(work, iterations, kind="process")
        await wg.wait()
        outcomes_final_at = loop.time() - start
        await wait_until_work_stopped(wg)
        wall = loop.time() - start
        probe.stop()
    results = wg.take_results()
    await wg.aclose()
    outcomes: dict[str, int] = {}
    for result in results[-ops:]:
        outcomes[result.outcome.name] = outcomes.get(result.outcome.name, 0) + 1
    return CpuRun(
        wall=wall,
        lag_p50=probe.percentile(0.50),
        lag_p99=probe.percentile(0.99),
        outcomes=outcomes,
        outcomes_final_at=outcomes_final_at,
    )


def pool_speedup(iterations: int, ops: int, workers: int) -> float:
    """Return serial time / ProcessPoolExecutor time for the same ops: the machine's headroom."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        list(pool.map(burn, [1] * workers))
        start = time.perf_counter()
        list(pool.map(burn, [iterations] * ops))
        parallel = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(ops):
        burn(iterations)
    serial = time.perf_counter() - start
    return serial / parallel


def bench_cpu(ops: int, repeats: int) -> None:
    cores = os.cpu_count() or 1
    iterations = calibrate(0.2)
    print(f"\nB3  {ops} CPU-bound ops of ~200 ms ({iterations:,} iterations), {cores} cores")
    print("    kind     limit   wall ms  speedup  lag p50 ms  lag p99 ms")

    best: dict[tuple[str, int], CpuRun] = {}
    configs = [("async", 1), ("thread", 2), ("thread", 4), ("process", 2), ("process", 4)]
    for _ in range(repeats):
        for kind, limit in configs:
            run = asyncio.run(cpu_run(kind, limit, iterations, ops, None))
            if (kind, limit) not in best or run.wall < best[kind, limit].wall:
                best[kind, limit] = run
    serial = best["async", 1].wall
    for (kind, limit), run in best.items():
        print(
            f"    {kind:8s} {limit:5d}  {run.wall * 1000:8.0f}  {serial / run.wall:6.2f}x"
            f"  {run.lag_p50 * 1000:10.1f}  {run.lag_p99 * 1000:10.1f}"
        )

    headroom = pool_speedup(iterations, ops, 2)
    print(
        "    machine headroom: a plain ProcessPoolExecutor(2) runs the same ops"
        f" {headroom:.2f}x faster than one process"
    )

    thread_wall = min(best["thread", 2].wall, best["thread", 4].wall)
    process_key = min([("process", 2), ("process", 4)], key=lambda key: best[key].wall)
    process = best[process_key]
    ratio = thread_wall / process.wall
    check(
        "B3 process vs thread speedup",
        f"{ratio:.2f}x ({process.wall * 1000:.0f} vs {thread_wall * 1000:.0f} ms;"
        f" plain process pool {headroom:.2f}x)",
        ">= 1.3x",
        ratio >= 1.3,
    )
    check(
        f"B3 loop-lag p99, process limit {process_key[1]}",
        f"{process.lag_p99 * 1000:.1f} ms",
        "< 10 ms",
        process.lag_p99 < 0.010,
    )
    bench_cpu_timeouts(iterations, ops, repeats)


def children_cpu() -> float:
    """CPU seconds of reaped child processes (the killed and stopped workers)."""
    times = os.times()
    return times.children_user + times.children_system


def worker_cpu(limit: int, iterations: int, ops: int, work: Callable[[int], object]) -> float:
    """Run ops that all time out at 100 ms and return the CPU seconds their workers used."""
    before = children_cpu()
    asyncio.run(cpu_run("process", limit, iterations, ops, 0.1, work))
    return children_cpu() - before


def bench_cpu_timeouts(iterations: int, ops: int, repeats: int) -> None:
    print("\nB3  same ops with op_timeout = 100 ms")
    thread = asyncio.run(cpu_run("thread", ops, iterations, ops, 0.1))
    print(
        f"    thread  limit {ops}: outcomes {thread.outcomes}, all final at"
        f" {thread.outcomes_final_at * 1000:.0f} ms, threads ran until"
        f" {thread.wall * 1000:.0f} ms"
    )
    check(
        "B3 thread timeouts reported",
        f"{thread.outcomes_final_at * 1000:.0f} ms (threads ran until {thread.wall * 1000:.0f} ms)",
        "~100 ms (< 250 ms)",
        thread.outcomes_final_at < 0.25 and thread.outcomes.get(Outcome.TIMED_OUT.name) == ops,
    )
    for limit in (2, ops):
        process = asyncio.run(cpu_run("process", limit, iterations, ops, 0.1))
        # Each op kills its worker, so every run starts and reaps the same number of
        # workers. A control run whose ops sleep measures their start-up and exit CPU,
        # and the difference is the CPU the ops burned before the kill.
        extra = []
        for _ in range(repeats):
            burning = worker_cpu(limit, iterations, ops, burn)
            control = worker_cpu(limit, iterations, ops, idle)
            extra.append(burning - control)
        per_op = statistics.median(extra) / ops
        print(
            f"    process limit {limit}: outcomes {process.outcomes}, all final at"
            f" {process.outcomes_final_at * 1000:.0f} ms, worker CPU per op"
            f" {per_op * 1000:.0f} ms (median of {repeats}, control run subtracted)"
        )
        check(
            f"B3 process limit {limit} CPU per timed-out op",
            f"{per_op * 1000:.0f} ms",
            f"<= 100 ms + kill grace ({KILL_GRACE * 1000:.0f} ms)",
            per_op <= 0.1 + KILL_GRACE,
        )


def print_checks() -> None:
    print("\nAcceptance")
    width = max(len(item.name) for item in CHECKS)
    for item in CHECKS:
        verdict = "PASS" if item.passed else "FAIL"
        print(f"    {verdict}  {item.name:{width}s}  {item.measured}  (goal {item.goal})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats and sizes (about a minute instead of two)",
    )
    parser.add_argument(
        "--only",
        choices=["B1", "B2", "B3"],
        action="append",
        help="run only this benchmark (repeatable); default: all three",
    )
    args = parser.parse_args()
    selected = set(args.only or ["B1", "B2", "B3"])
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load}")
    if "B1" in selected:
        bench_overhead(ops=10_000, repeats=3 if args.quick else 5)
    if "B2" in selected:
        sizes = [1, 3, 10] if args.quick else [1, 3, 10, 100]
        bench_io(sizes=sizes, latencies=[0.01, 0.2])
    if "B3" in selected:
        bench_cpu(ops=4, repeats=1 if args.quick else 3)
    print_checks()
    return 0 if all(item.passed for item in CHECKS) else 1


if __name__ == "__main__":
    sys.exit(main())
