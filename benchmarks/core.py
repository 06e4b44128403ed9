"""NumPy reference BatchNorm vs torch.nn.BatchNorm2d on CPU, measured side by side.

Prints time(bnkit.BatchNorm) / time(torch.nn.BatchNorm2d) for a (32, 64, 56, 56)
float32 batch: training forward+backward, and eval forward, both sides on the same number
of threads (``--threads``, default 1: ``torch.set_num_threads`` and ``bnkit.set_num_threads``).
The two run alternately, one call each per round; ``ratio`` is best over best, ``median``
the median of the per-round ratios. With one thread each the times are this process's CPU
time, which other processes on a shared machine skew far less (they still share caches and
memory bandwidth); with more, wall-clock time, which they skew a lot (PyTorch's OpenMP kernels
slow down far more under load than NumPy's threads, and its idle workers spin on the cores
after each call). A case is "ok" when both the median
and the best-over-best ratio meet its target. Targets: eval within 2x, train within 2.5x.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import bnkit
from bnkit import BatchNorm
from _timing import steady_malloc


def timer(clock):
    def timed(fn) -> float:
        t0 = clock()
        fn()
        return clock() - t0
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--threads", type=int, default=1, help="threads for each side (default 1)")
    parser.add_argument("--keep-malloc", action="store_true",
                        help="leave glibc's malloc thresholds alone (fresh 25 MB outputs then page-fault on every call)")
    args = parser.parse_args()
    steady = False if args.keep_malloc else steady_malloc()
    torch.set_num_threads(args.threads)
    bnkit.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    timed = timer(clock)
    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    xt, dyt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(dy)
    ref, tbn = BatchNorm(shape[1]), torch.nn.BatchNorm2d(shape[1])

    def np_train():
        ref.train()
        ref(x)
        ref.backward(dy)

    def torch_train():
        tbn.train()
        xt.grad = None
        tbn(xt).backward(dyt)

    def np_eval():
        ref.eval()
        ref(x)

    def torch_eval():
        tbn.eval()
        with torch.no_grad():
            tbn(xt)

    rows = []
    for name, f_np, f_t, target in [("train fwd+bwd", np_train, torch_train, 2.5), ("eval fwd", np_eval, torch_eval, 2.0)]:
        # alternate so both see the same machine load
        f_np(), f_t()  # warm-up
        t_np, t_t = [], []
        for _ in range(args.repeats):
            t_np.append(timed(f_np))
            t_t.append(timed(f_t))
        median = statistics.median(a / b for a, b in zip(t_np, t_t))
        rows.append((name, min(t_np), min(t_t), min(t_np) / min(t_t), median, target))
    print(f"shape {shape} float32, threads: torch {torch.get_num_threads()}, bnkit {bnkit.get_num_threads()}; "
          f"{'CPU' if clock is time.process_time else 'wall-clock'} time; "
          f"malloc thresholds {'fixed' if steady else 'default'}")
    print(f"{'case':<15} {'bnkit ms':>9} {'torch ms':>9} {'ratio':>6} {'median':>6} {'target':>7}")
    for name, a, b, r, med, target in rows:
        verdict = "ok" if max(med, r) <= target else "MISSED"
        print(f"{name:<15} {a*1e3:9.1f} {b*1e3:9.1f} {r:6.2f} {med:6.2f} {'<= ' + str(target):>7} {verdict}")


if __name__ == "__main__":
    main()
