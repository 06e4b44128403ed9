"""NumPy reference BatchNorm vs torch.nn.BatchNorm2d on CPU, measured side by side.

Prints time(bnkit.BatchNorm) / time(torch.nn.BatchNorm2d) for a (32, 64, 56, 56)
float32 batch: training forward+backward, and eval forward, both with the machine's
threads. The two run alternately, one call each per round; ``ratio`` is best over best,
``median`` the median of the per-round ratios (robust to load that comes and goes).
Targets: eval within 2x, train within 2.5x.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bnkit import BatchNorm
from _timing import steady_malloc


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--keep-malloc", action="store_true",
                        help="leave glibc's malloc thresholds alone (fresh 25 MB outputs then page-fault on every call)")
    args = parser.parse_args()
    steady = False if args.keep_malloc else steady_malloc()
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
    print(f"shape {shape} float32, torch threads {torch.get_num_threads()}, malloc thresholds {'fixed' if steady else 'default'}")
    print(f"{'case':<15} {'bnkit ms':>9} {'torch ms':>9} {'ratio':>6} {'median':>6} {'target':>7}")
    for name, a, b, r, med, target in rows:
        verdict = "ok" if med <= target else "MISSED"
        print(f"{name:<15} {a*1e3:9.1f} {b*1e3:9.1f} {r:6.2f} {med:6.2f} {'<= ' + str(target):>7} {verdict} (median)")


if __name__ == "__main__":
    main()
