"""bnkit's drop-in BatchNorm2d (extras off) and bn_guard vs plain PyTorch, measured side by side.

Prints time(bnkit) / time(plain torch) for:

* the drop-in ``bnkit.torch.BatchNorm2d`` vs ``nn.BatchNorm2d``: training forward
  and eval forward, on a large and on a small input (where per-call Python
  overhead shows);
* a ResNet under ``with bn_guard(model)`` vs the same model unguarded (eval forward);
* ``protect_stats`` around a training forward vs the bare forward.

Target: every ratio within 1.05. Many short runs are interleaved (A, B, A, B,
...) and the best of each side is kept, so bursts of load from other processes
(which hit either side at random) drop out.
Run with ``OMP_NUM_THREADS=1`` for stable figures.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from bnkit.torch import BatchNorm2d, bn_guard, protect_stats
from bnkit.torch.zoo import SmallResNet


def paired_best(fa, fb, repeats: int, inner: int) -> tuple[float, float]:
    """Best time per call of ``fa`` and of ``fb``, measured alternately."""
    fa(), fb()  # warm-up
    best_a = best_b = float("inf")
    for _ in range(repeats):
        for f, is_a in ((fa, True), (fb, False)):
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            dt = (time.perf_counter() - t0) / inner
            if is_a:
                best_a = min(best_a, dt)
            else:
                best_b = min(best_b, dt)
    return best_a, best_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20, help="interleaved runs per case (x15 for the small input)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []

    for shape, inner, repeats in (((32, 64, 28, 28), 1, args.repeats), ((8, 64, 4, 4), 20, 15 * args.repeats)):
        x = torch.randn(shape)
        ref, ours = nn.BatchNorm2d(shape[1]), BatchNorm2d(shape[1])
        for mode in ("train", "eval"):
            ref.train(mode == "train"), ours.train(mode == "train")
            with torch.no_grad():
                t_ours, t_ref = paired_best(lambda: ours(x), lambda: ref(x), repeats, inner)
            rows.append((f"drop-in BatchNorm2d {mode} fwd {shape}", t_ours, t_ref))

    model = SmallResNet().eval()  # 5 BN layers, 8x8 digits: a small forward, so per-call overhead shows
    x = torch.randn(32, 1, 8, 8)
    reps = 10 * args.repeats
    with torch.no_grad():
        for _ in range(3):
            model.train()(x)
    model.eval()
    twin = copy.deepcopy(model)  # guarded for the whole measurement; model stays unguarded
    with torch.no_grad(), bn_guard(twin):
        t_inside, t_plain = paired_best(lambda: twin(x), lambda: model(x), reps, 3)
    rows.append(("ResNet eval fwd inside one bn_guard", t_inside, t_plain))
    guard = bn_guard(model)

    def guarded():
        with guard:
            model(x)

    with torch.no_grad():
        t_guard, t_plain = paired_best(guarded, lambda: model(x), reps, 3)
    rows.append(("ResNet eval fwd, entering bn_guard per call", t_guard, t_plain))

    model.train()

    def protected():
        with protect_stats(model, warn=False):
            model(x)

    with torch.no_grad():
        t_prot, t_bare = paired_best(protected, lambda: model(x), reps, 3)
    rows.append(("ResNet train fwd under protect_stats", t_prot, t_bare))

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, best of many interleaved runs per case")
    print(f"{'case':58s} {'bnkit ms':>9s} {'torch ms':>9s} {'ratio':>6s}")
    for name, a, b in rows:
        print(f"{name:58s} {a * 1e3:9.3f} {b * 1e3:9.3f} {a / b:6.3f}")


if __name__ == "__main__":
    main()
