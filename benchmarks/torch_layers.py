"""bnkit's drop-in BatchNorm2d (extras off) and bn_guard vs plain PyTorch, measured side by side.

Prints time(bnkit) / time(plain torch) for:

* the drop-in ``bnkit.torch.BatchNorm2d`` vs ``nn.BatchNorm2d``: training forward
  and eval forward, on a large and on a small input (where per-call Python
  overhead shows);
* a ResNet under ``with bn_guard(model)`` vs the same model unguarded (eval forward): one guard
  object entered per call (a decorator, or a guard kept for a loop: its statistics checks are
  cached) and a new guard per call (``with bn_guard(model): ...`` as written inline, which
  lists the layers and reads every statistic again);
* ``protect_stats`` around a training forward vs the bare forward.

The guard and ``protect_stats`` cost a fixed few microseconds per entry, so they are
shown twice: on a deliberately tiny ResNet (8x8 digits, a forward under 1 ms, where
the fixed cost shows most) and on a realistically sized one (widths 64/128/256,
batch 16 of 3x32x32), where ``protect_stats`` wraps a whole training step
(forward, backward, SGD step).

Target: every ratio within 1.05. Many short runs are interleaved (A, B, A, B,
...); printed are the best time of each side, their ratio, and the median of the
ratios within each pair (load that drifts between pairs cancels). With one torch
thread (the default) times are the calling thread's CPU time (``time.thread_time``;
every op runs on that thread), so time the scheduler gives other processes on a
shared machine is not counted; ``--threads`` above 1 gives wall times. On glibc,
malloc's mmap/trim thresholds are fixed first so that freed activations are reused
rather than faulted in again (as benchmarks/fold.py does).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from bnkit.torch import BatchNorm2d, bn_guard, protect_stats
from bnkit.torch.zoo import SmallResNet
from _timing import steady_malloc


CLOCK = time.perf_counter


def paired(fa, fb, repeats: int, inner: int) -> tuple[float, float, float]:
    """Best time per call of ``fa`` and of ``fb``, measured alternately, and the median ratio within pairs."""
    fa(), fb()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        for f, times in ((fa, times_a), (fb, times_b)):
            t0 = CLOCK()
            for _ in range(inner):
                f()
            times.append((CLOCK() - t0) / inner)
    return min(times_a), min(times_b), statistics.median(a / b for a, b in zip(times_a, times_b))


def guard_rows(label: str, model: nn.Module, x: torch.Tensor, repeats: int, inner: int) -> list[tuple]:
    """An eval forward under one kept ``bn_guard`` entered per call, and under a new guard per call, vs unguarded."""
    guard = bn_guard(model)

    def guarded():
        with guard:
            model(x)

    def new_guard():
        with bn_guard(model):
            model(x)

    with torch.no_grad():
        return [(f"{label} eval fwd, bn_guard per call", *paired(guarded, lambda: model(x), repeats, inner)),
                (f"{label} eval fwd, new bn_guard per call", *paired(new_guard, lambda: model(x), repeats, inner))]


def realistic(repeats: int) -> list[tuple]:
    """The guard per call and protect_stats per training step on a CIFAR-sized ResNet, batch 16."""
    torch.manual_seed(0)
    model = SmallResNet(in_channels=3, widths=(64, 128, 256))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    with torch.no_grad():
        model.train()(x)
    rows = guard_rows("ResNet-64/128/256 b16", model.eval(), x, repeats, 1)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def protected_step():
        with protect_stats(model, warn=False):
            step()

    rows.append(("ResNet-64/128/256 b16 train step, protect_stats", *paired(protected_step, step, repeats, 1)))
    return rows


def main() -> None:
    global CLOCK
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="interleaved runs per case (x15 for the small input)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    CLOCK = time.thread_time if args.threads == 1 else time.perf_counter
    steady = steady_malloc()
    torch.manual_seed(0)
    rows = []

    for shape, inner, repeats in (((32, 64, 28, 28), 1, args.repeats), ((8, 64, 4, 4), 20, 15 * args.repeats)):
        x = torch.randn(shape)
        ref, ours = nn.BatchNorm2d(shape[1]), BatchNorm2d(shape[1])
        for mode in ("train", "eval"):
            ref.train(mode == "train"), ours.train(mode == "train")
            with torch.no_grad():
                rows.append((f"drop-in BatchNorm2d {mode} fwd {shape}", *paired(lambda: ours(x), lambda: ref(x),
                                                                                  repeats, inner)))

    model = SmallResNet().eval()  # 5 BN layers, 8x8 digits: a tiny forward, so the fixed per-call cost shows most
    x = torch.randn(32, 1, 8, 8)
    reps = 10 * args.repeats
    with torch.no_grad():
        for _ in range(3):
            model.train()(x)
    model.eval()
    twin = copy.deepcopy(model)  # guarded for the whole measurement; model stays unguarded
    with torch.no_grad(), bn_guard(twin):
        rows.append(("tiny ResNet b32 eval fwd inside one bn_guard", *paired(lambda: twin(x), lambda: model(x),
                                                                             reps, 3)))
    rows += guard_rows("tiny ResNet b32", model, x, reps, 3)

    model.train()

    def protected():
        with protect_stats(model, warn=False):
            model(x)

    with torch.no_grad():
        rows.append(("tiny ResNet b32 train fwd, protect_stats", *paired(protected, lambda: model(x), reps, 3)))

    rows += realistic(args.repeats)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{'thread CPU' if CLOCK is time.thread_time else 'wall'} time, "
          f"malloc thresholds {'fixed' if steady else 'as glibc sets them'}; interleaved runs per case")
    print(f"{'case':54s} {'bnkit ms':>9s} {'torch ms':>9s} {'ratio':>6s} {'median':>7s}")
    for name, a, b, med in rows:
        print(f"{name:54s} {a * 1e3:9.3f} {b * 1e3:9.3f} {a / b:6.3f} {med:7.3f}")


if __name__ == "__main__":
    main()
