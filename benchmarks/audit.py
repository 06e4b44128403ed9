"""Cost of ``bnkit.torch.audit(model, data)`` against plain forward passes, measured side by side.

For each model: the time of the whole audit with data (state and flag checks, fold
analysis, one batch-statistics forward per batch with per-layer float64 moments, the
eval-mode gap and the batch-size-1 check) divided by the time of the same number of
plain eval-mode forward passes over the same batches. Target: within 1.2.
For reference, ``train-BN fwd``: the same forwards with the BN layers in training mode
(PyTorch's own way to normalize with batch statistics, on a copy), the naive cost of
measuring batch statistics. Also printed: the model-only audit (flags and fold analysis, which costs the same
whatever the data size) and the ratio without it, which is what each extra batch costs.
Best of ``--repeats`` for each, interleaved, in CPU time of this process (``time.process_time``:
other processes on a shared machine do not skew it), one thread unless ``--threads`` says otherwise.
On glibc, malloc's mmap and trim thresholds are fixed first (``mallopt``, as in
``benchmarks/fold.py``) so freed activations are reused rather than returned to the OS
and faulted in again: left to glibc's dynamic thresholds, the audit's extra temporaries
tip later activations of both runs into fresh mappings and every op that writes one
pays page faults (``--keep-malloc`` turns this off).
Also printed: how much the process's peak resident memory grew over three audits run after the plain
forwards (``ru_maxrss``; the data and the activations of a forward are already counted then). Memory freed by
earlier models is reused, so for all but the first model it is a lower bound: ``--models NAME`` gives one
model's own figure.
"""
from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
import resource
import time

import torch
from _timing import steady_malloc

from bnkit.torch import audit
from bnkit.torch.zoo import MLP, MobileNetV2Tiny, SmallResNet, VGGBN

#: name: (input shape without the batch, factory)
MODELS = {
    "resnet": ((3, 16, 16), lambda: SmallResNet(in_channels=3, widths=(32, 64))),
    "mobilenet": ((3, 32, 32), lambda: MobileNetV2Tiny(in_channels=3)),
    "vgg": ((3, 8, 8), lambda: VGGBN(in_channels=3)),
    "mlp": ((256,), lambda: MLP(in_features=256, hidden=(512, 256))),
}


def best_of(fns: dict, repeats: int) -> dict[str, float]:
    """Minimum CPU time of each function, run interleaved ``repeats`` times after a warm-up."""
    best = {}
    for name, fn in fns.items():
        fn()
        best[name] = float("inf")
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t0)
    return best


def rss_growth_mib(before: Callable[[], object], fn: Callable[[], object], times: int = 3) -> float:
    """Growth of the peak resident memory (MiB) over ``times`` runs of ``fn``, after one run of ``before``."""
    before()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(times):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024  # KiB on Linux


def _warm(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """Give the BN layers trained-looking running statistics."""
    model.train()
    with torch.no_grad():
        for seed in range(5):
            model(torch.randn(64, *shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--keep-malloc", action="store_true", help="leave glibc's malloc thresholds as they are")
    args = parser.parse_args()
    steady = False if args.keep_malloc else steady_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.batches} batches of {args.batch_size}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"malloc thresholds {'fixed' if steady else 'as glibc sets them'}")
    print(f"{'model':<10} {'plain fwd (s)':>14} {'audit (s)':>10} {'ratio':>7} {'model-only (s)':>15} "
          f"{'ratio without it':>17} {'train-BN fwd ratio':>19} {'audit RSS growth (MiB)':>23}  target <= 1.2")
    worst = 0.0
    for name in args.models:
        shape, build = MODELS[name]
        model = _warm(build(), shape)
        data = torch.randn(args.batches * args.batch_size, *shape)
        batches = list(torch.split(data, args.batch_size))

        def plain():
            with torch.no_grad():
                for b in batches:
                    model(b)

        train_bn = copy.deepcopy(model)
        for m in train_bn.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()

        def train_mode():
            with torch.no_grad():
                for b in batches:
                    train_bn(b)

        def audited():
            audit(model, data, batch_size=args.batch_size)

        growth = rss_growth_mib(plain, audited)  # before the timings, whose audits would raise the peak first
        t = best_of({"plain": plain, "audit": audited, "model": lambda: audit(model), "train": train_mode}, args.repeats)
        t_plain, t_audit, t_model = t["plain"], t["audit"], t["model"]
        ratio = t_audit / t_plain
        worst = max(worst, ratio)
        print(f"{name:<10} {t_plain:>14.3f} {t_audit:>10.3f} {ratio:>7.2f} {t_model:>15.3f} "
              f"{(t_audit - t_model) / t_plain:>17.2f} {t['train'] / t_plain:>19.2f} {growth:>23.1f}  "
              f"{'ok' if ratio <= 1.2 else 'OVER'}")
    print(f"worst ratio {worst:.2f} ({'meets' if worst <= 1.2 else 'misses'} the 1.2 target)")


if __name__ == "__main__":
    main()
