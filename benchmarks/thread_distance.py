"""Two-thread latency of a sparse ResNet-50 beside the distance between the two CPUs.

Run by hand, on a machine with a C compiler:
    OMP_WAIT_POLICY=PASSIVE python benchmarks/thread_distance.py --seconds 300

On a virtual machine the host decides where the two virtual CPUs run, and it may move them:
near each other (sharing a last-level cache) for a while, then far apart. This script
measures, in turns, how long a cache line takes to go from one CPU to the other and back (a
small C program pinned to the first two CPUs, 100,000 round trips, started before and after
each sample) and the median of 15 calls of ResNet-50 at the 95.15% budget (random weights
pruned by magnitude, replayed) at batch 1 on 2 threads, with one onnxruntime call of the
dense model on 2 threads for comparison. A sample whose two round trips are both under
``--far-ns`` counts as near, both over it as far; the summary gives each group's medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

from strsparse.inference import export_onnx, to_sparse

PING_PONG = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

static _Alignas(64) atomic_int turn;
static int cpus[2];

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *answer(void *arg) {
    (void)arg;
    pin(cpus[1]);
    for (int i = 0; i < 100000; i++) {
        while (atomic_load(&turn) != 1) {}
        atomic_store(&turn, 0);
    }
    return NULL;
}

int main(void) {
    cpu_set_t mine;
    sched_getaffinity(0, sizeof mine, &mine);
    for (int c = 0, n = 0; c < CPU_SETSIZE && n < 2; c++)
        if (CPU_ISSET(c, &mine)) cpus[n++] = c;
    pin(cpus[0]);
    pthread_t t;
    pthread_create(&t, NULL, answer, NULL);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < 100000; i++) {
        atomic_store(&turn, 1);
        while (atomic_load(&turn) != 0) {}
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    pthread_join(t, NULL);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 100000.0);
    return 0;
}
"""


def build_ping_pong(directory: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("thread_distance.py needs a C compiler (cc or gcc) on PATH")
    source, binary = directory / "ping_pong.c", directory / "ping_pong"
    source.write_text(PING_PONG)
    subprocess.run([compiler, "-O2", "-pthread", "-o", str(binary), str(source)], check=True)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--far-ns", type=float, default=200.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    from sparse_inference import ort_session, pruned_model  # beside this script

    tmp = Path(tempfile.mkdtemp(prefix="strsparse-distance-"))
    ping_pong = build_ping_pong(tmp)

    def round_trip() -> float:
        return float(subprocess.run([str(ping_pong)], capture_output=True, text=True).stdout)

    torch.set_num_threads(2)
    model = pruned_model("resnet50", "resnet50-str-95.15")
    sparse = to_sparse(model)
    x = torch.randn(1, 3, 224, 224)
    export_onnx(model, tmp / "resnet50.onnx", x)
    session = ort_session(str(tmp / "resnet50.onnx"), 2)
    feed = {"input": x.numpy()}
    rows: list[tuple[float, float, float, float]] = []
    print("round trip before, after (ns) | sparse, median of 15 (ms) | onnxruntime (ms)")
    with torch.inference_mode():
        for _ in range(3):
            sparse(x)
            session.run(None, feed)
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            before = round_trip()
            calls = []
            for _ in range(15):
                start = time.perf_counter()
                sparse(x)
                calls.append(time.perf_counter() - start)
            start = time.perf_counter()
            session.run(None, feed)
            ort = time.perf_counter() - start
            after = round_trip()
            rows.append((before, after, 1e3 * statistics.median(calls), 1e3 * ort))
            print(
                f"{before:6.0f} {after:6.0f} | {rows[-1][2]:6.2f} | {rows[-1][3]:6.2f}", flush=True
            )
    groups = {
        "near": [r for r in rows if max(r[0], r[1]) < args.far_ns],
        "far": [r for r in rows if min(r[0], r[1]) >= args.far_ns],
    }
    for name, group in groups.items():
        if group:
            print(
                f"{name}: {len(group)} of {len(rows)} samples, round trip "
                f"{statistics.median(r[0] for r in group):.0f} ns, sparse "
                f"{statistics.median(r[2] for r in group):.2f} ms, onnxruntime "
                f"{statistics.median(r[3] for r in group):.2f} ms"
            )
        else:
            print(f"{name}: no samples")


if __name__ == "__main__":
    main()
