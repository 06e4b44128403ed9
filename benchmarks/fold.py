"""Latency of BN folding on CPU, measured side by side in one run.

For each model and batch size (1 and 16) this times, in eval mode under
``torch.inference_mode``:

* ``unfolded``: the model as trained (the denominator of every ratio);
* ``bnkit``: ``bnkit.torch.fold_bn(model)``;
* ``fx fuse``: ``torch.fx.experimental.optimization.fuse(model)``;
* ``lower bound``: the same architecture with every BN replaced by ``nn.Identity``
  (no normalization cost at all; not a correct model);
* ``lower+bias``: the lower bound where every layer bnkit gave a bias has a (zero)
  bias too: structurally the folded model. bnkit over it shows the timing noise,
  and the lower bound over it the cost of PyTorch's bias add, which a fold cannot
  avoid (the BN shift has to go somewhere) and which is several percent of a small
  convolution at batch 1.

On glibc the benchmark first fixes malloc's mmap and trim thresholds (``mallopt``)
so freed activations are reused instead of being returned to the OS and faulted in
again by whichever op writes the next fresh buffer: left to glibc's dynamic
threshold, those page faults made the same model 1.5-2x slower in some processes
than in others at batch 16 (``--keep-malloc`` turns this off).

With one torch thread (the default) times are the calling thread's CPU time
(``time.thread_time``; every op runs on that thread), so time the scheduler gives
other processes on a shared machine is not counted; with ``--threads`` above 1, or
``--clock wall``, they are wall times (``time.perf_counter``). The variants are run
round-robin in a shuffled order, a few milliseconds each per round, so the variants
of one round run next to each other in time. Every ratio is the median over rounds
of the ratio within a round (a paired comparison: load from other processes that
drifts between rounds cancels). Printed: each variant's time over the unfolded
time, and bnkit's time over the lower bound and over fx fuse, the last two also as
the ratio of the best (minimum) times, which on a busy machine is the least
disturbed estimate.

Targets (issue 5): bnkit within 1.02 of the lower bound, never slower than fx fuse. The
last line also gives bnkit's worst ratio to ``lower+bias``, the floor for any fold.
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from bnkit.torch import bn_layers, fold_bn
from bnkit.torch.zoo import MLP, MobileNetV2Tiny, SmallResNet, VGGBN
from _timing import steady_malloc


def calibrate(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *shape[1:]))
    return model.eval()


def bn_to_identity(model: nn.Module, biases: list[str] = ()) -> nn.Module:
    """Every BN replaced by ``nn.Identity``; the layers named in ``biases`` get a zero bias."""
    lower = copy.deepcopy(model)
    for name, _ in bn_layers(model):
        parent, _, leaf = name.rpartition(".")
        setattr(lower.get_submodule(parent) if parent else lower, leaf, nn.Identity())
    for name in biases:
        layer = lower.get_submodule(name)
        n = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        layer.bias = nn.Parameter(torch.zeros(n, dtype=layer.weight.dtype))
    return lower


def round_robin(
    fns: dict[str, Callable[[], object]], rounds: int, inner: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Per-call seconds of every function in every round; the functions take turns within a round."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)  # no variant always follows the same one (whose weights just left the cache)
        for key in order:
            fn = fns[key]
            t0 = clock()
            for _ in range(inner):
                fn()
            samples[key].append((clock() - t0) / inner)
    return samples


def paired_ratio(samples: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(samples[num], samples[den]))


def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    return {
        "resnet 3x32x32": (SmallResNet(in_channels=3, widths=(32, 64)), (1, 3, 32, 32)),
        "mobilenet 3x32": (MobileNetV2Tiny(in_channels=3), (1, 3, 32, 32)),
        "vgg-bn 1x8x8": (VGGBN(), (1, 1, 8, 8)),
        "mlp 64": (MLP(), (1, 64)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1001, help="most timed rounds per variant (median taken)")
    parser.add_argument("--seconds", type=float, default=10.0, help="rough time budget per model and batch size")
    parser.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="thread CPU time (one thread only) or wall time"
    )
    parser.add_argument("--keep-malloc", action="store_true", help="leave glibc's malloc thresholds as they are")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steady = False if args.keep_malloc else steady_malloc()
    cpu_clock = args.clock == "cpu" and args.threads == 1
    clock = time.thread_time if cpu_clock else time.perf_counter
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from torch.fx.experimental.optimization import fuse

    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s), "
          f"{'thread CPU' if cpu_clock else 'wall'} time, up to {args.rounds} rounds, "
          f"malloc thresholds {'fixed' if steady else 'as glibc sets them'}")
    print(f"{'':<28}{'time / unfolded (median)':^31}{'bnkit/lower':^16}{'bnkit/fx fuse':^16}{'bnkit/':>8}{'lower/':>8}")
    print(
        f"{'model':<16}{'batch':>6}{'ms':>6}  {'bnkit':>9}{'fx fuse':>10}{'lower':>10}  {'median':>8}{'best':>7}  "
        f"{'median':>8}{'best':>7}{'lower+b':>8}{'lower+b':>8}"
    )
    worst = {"lower": [0.0, 0.0], "fx": [0.0, 0.0], "lower+bias": [0.0, 0.0]}
    for name, (model, shape) in models().items():
        model = calibrate(model, shape)
        folded, report = fold_bn(model, torch.randn(4, *shape[1:]))
        assert report.n_left == 0, report.summary()
        variants = {
            "unfolded": model, "bnkit": folded, "fx": fuse(model), "lower": bn_to_identity(model),
            "lower+bias": bn_to_identity(model, [f.into for f in report.folded if f.bias_added]),
        }
        for batch in (1, 16):
            x = torch.randn(batch, *shape[1:])
            once = _once(model, x)
            inner = max(1, int(2e-3 / once))  # about 2 ms per timed sample
            rounds = max(21, min(args.rounds, int(args.seconds / (len(variants) * inner * once))))

            def call(m, x=x):
                return lambda: m(x)

            with torch.inference_mode():
                t = round_robin({k: call(m) for k, m in variants.items()}, rounds, inner, clock)
            r = {k: paired_ratio(t, k, "unfolded") for k in ("bnkit", "fx", "lower")}
            row = {}
            for other in ("lower", "fx", "lower+bias"):
                row[other] = (paired_ratio(t, "bnkit", other), min(t["bnkit"]) / min(t[other]))
                worst[other] = [max(w, v) for w, v in zip(worst[other], row[other])]
            print(
                f"{name:<16}{batch:>6}{statistics.median(t['unfolded']) * 1e3:>6.2f}  "
                f"{r['bnkit']:>9.3f}{r['fx']:>10.3f}{r['lower']:>10.3f}  "
                f"{row['lower'][0]:>8.3f}{row['lower'][1]:>7.3f}  {row['fx'][0]:>8.3f}{row['fx'][1]:>7.3f}"
                f"{row['lower+bias'][0]:>8.3f}{paired_ratio(t, 'lower', 'lower+bias'):>8.3f}"
            )
    print(
        f"worst bnkit/lower bound: median {worst['lower'][0]:.3f}, best {worst['lower'][1]:.3f} (target <= 1.02); "
        f"worst bnkit/fx fuse: median {worst['fx'][0]:.3f}, best {worst['fx'][1]:.3f} (target <= 1)\n"
        f"worst bnkit/lower+bias, the floor of any fold (it must add the BN shift as a bias): "
        f"median {worst['lower+bias'][0]:.3f}, best {worst['lower+bias'][1]:.3f}"
    )


def _once(model: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        model(x)
        return max(time.perf_counter() - t0, 1e-6)


if __name__ == "__main__":
    main()
