"""Recalibration: bnkit.torch.recalibrate vs torch.optim.swa_utils.update_bn vs fvcore's update_bn_stats.

One run, same model and batches for every method:

* time: best wall time of one pass, relative to the same number of plain
  training-mode forward passes under ``torch.no_grad()`` (the cost floor of any
  one-pass method); repeats are interleaved so load on the machine hits all alike.
  The process CPU time ratio is printed beside it: with one thread it is the
  same measure, but it does not count time the process spent descheduled, so
  it is the steadier figure on a shared machine.
* error: max relative error of each method's ``running_mean`` / ``running_var``
  against the exact population statistics, computed independently here: every
  BN input of a float64 copy of the model (only BN in training mode) captured by
  hooks and reduced in NumPy over all samples. Each method's variance is scored
  against the convention it writes: bnkit and ``update_bn`` PyTorch's unbiased
  one (``np.var(ddof=1)``, as training writes ``running_var``), fvcore the biased
  population variance (``ddof=0``: its ``_PopulationVarianceEstimator`` undoes
  each batch's Bessel correction on purpose), so a convention is never counted
  as an error (column ``var``). Relative error per channel is
  ``|got - exact| / (|exact| + std)`` for means and ``|got - exact| / exact``
  for variances. The float32 methods all also carry the rounding of the float32
  forward itself, which sets the floor in ``offset``.

Data sets (load_digits, 1797 images 8x8, batches of 64 and a last one of 5):
``shuffled`` (inputs scaled to [0, 1], random order: the friendly case) and
``sorted-raw`` (inputs on a 0..255 scale, ordered by class, as an unshuffled
pass over a class- or domain-ordered set gives), both through a SmallResNet;
and ``offset``: unnormalized features with a large common level (0..255 plus
1e5, as raw counts or timestamps are) through the zoo MLP, so its first BN
input has ``|mean| / std`` in the thousands (printed). That whole pass takes
~3 ms, so each method's fixed cost per call (setup, restoring, the report)
shows; ``offset x8`` is the same data passed 8 times (232 batches), where the
cost per batch dominates.

On a GPU (``--device cuda``) the model and batches live there and every timed
pass ends with ``torch.cuda.synchronize()``; on 8x8 digits the passes are small
and measure each method's per-batch launch and bookkeeping cost more than
arithmetic, ``--upsample K`` makes every image ``8K x 8K`` (pixels repeated) to
give the GPU real work. The process CPU column then counts the host's share only.

Run: ``OMP_NUM_THREADS=1 python benchmarks/recalibrate.py [--repeats 15] [--threads 1] [--device cuda]``.
"""
from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from bnkit.torch import bn_layers, recalibrate
from bnkit.torch.zoo import MLP, SmallResNet


def load_batches(order: str, batch_size: int = 64, upsample: int = 1) -> list[torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.images.astype(np.float32), d.target
    x = x.repeat(upsample, axis=1).repeat(upsample, axis=2)  # each pixel a block of upsample x upsample
    if order == "shuffled":
        x = x[np.random.default_rng(0).permutation(len(x))] / 16.0
    elif order == "sorted-raw":
        x = x[np.argsort(y, kind="stable")] * (255.0 / 16.0)
    else:  # "offset": shuffled, with a large constant level on every pixel; "offset x8": that, 8 times
        x = x[np.random.default_rng(0).permutation(len(x))] * (255.0 / 16.0) + 1e5
    batches = list(torch.from_numpy(x[:, None]).split(batch_size))
    return batches * 8 if order == "offset x8" else batches


def make_model(order: str, pixels: int = 64) -> nn.Module:
    torch.manual_seed(0)
    model = MLP(pixels, hidden=(128, 64)) if order.startswith("offset") else SmallResNet(widths=(32, 64))
    with torch.no_grad():  # a trained-looking model: non-trivial affine parameters, stale statistics
        for _, bn in bn_layers(model):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def exact_stats(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Population statistics of every BN input of the model evaluated in float64 (no method's rounding)."""
    ref = copy.deepcopy(model).cpu().double()
    seen: dict[str, list[np.ndarray]] = {}
    for name, bn in bn_layers(ref):
        bn.train()
        bn.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(
            np.moveaxis(a[0].numpy(), 1, 0).reshape(m.num_features, -1)))
    with torch.no_grad():
        for b in batches:
            ref(b.cpu().double())
    out = {}
    for name, parts in seen.items():
        allx = np.concatenate(parts, axis=1)
        out[name] = (allx.mean(axis=1), allx.var(axis=1, ddof=1), allx.var(axis=1, ddof=0))
    return out


def mean_to_std(exact) -> float:
    """Largest ``|mean| / std`` over every channel of every BN input."""
    return max(float(np.max(np.abs(m) / np.sqrt(v))) for m, v, _ in exact.values())


#: The variance each method writes: PyTorch's unbiased one, or fvcore's biased population variance.
UNBIASED, BIASED = "ddof=1", "ddof=0"


def max_errors(model: nn.Module, exact, convention: str = UNBIASED) -> tuple[float, float]:
    em = ev = 0.0
    for name, bn in bn_layers(model):
        mean, unbiased, biased = exact[name]
        var = unbiased if convention == UNBIASED else biased
        got_m, got_v = bn.running_mean.double().cpu().numpy(), bn.running_var.double().cpu().numpy()
        em = max(em, float(np.max(np.abs(got_m - mean) / (np.abs(mean) + np.sqrt(var)))))
        ev = max(ev, float(np.max(np.abs(got_v - var) / var)))
    return em, ev


def plain_forward(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    model.eval()


def run_bnkit(model: nn.Module, batches: list[torch.Tensor]) -> None:
    recalibrate(model, batches, progress=False)


def run_update_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    torch.optim.swa_utils.update_bn(batches, model)


def run_fvcore(model: nn.Module, batches: list[torch.Tensor]) -> None:
    from fvcore.nn.precise_bn import update_bn_stats

    model.train()  # fvcore only recalibrates BN layers the caller put in training mode
    update_bn_stats(model, batches, num_iters=len(batches))
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--upsample", type=int, default=1, help="repeat each pixel KxK times (images 8K x 8K)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    methods: dict[str, Callable[[nn.Module, list[torch.Tensor]], None]] = {
        "plain train-mode forward": plain_forward, "bnkit recalibrate": run_bnkit, "torch update_bn": run_update_bn,
    }
    convention = {name: UNBIASED for name in methods}
    try:
        import fvcore  # noqa: F401

        methods["fvcore update_bn_stats"] = run_fvcore
        convention["fvcore update_bn_stats"] = BIASED
    except ImportError:
        print("fvcore is not installed (pip install 'bnkit[bench]'): skipping it")

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, {args.threads} thread(s); times: best of {args.repeats} interleaved "
          "repeats")
    for order in ("shuffled", "sorted-raw", "offset", "offset x8"):
        model = make_model(order, 64 * args.upsample ** 2).to(device)
        batches = [b.to(device) for b in load_batches(order, upsample=args.upsample)]
        exact = exact_stats(model, batches)
        wall: dict[str, list[float]] = {name: [] for name in methods}
        cpu: dict[str, list[float]] = {name: [] for name in methods}
        errors = {}
        for _ in range(args.repeats):
            for name, method in methods.items():
                m = copy.deepcopy(model)
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                method(m, batches)
                sync()
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start)
                errors[name] = max_errors(m, exact, convention[name])
        base, base_cpu = min(wall["plain train-mode forward"]), min(cpu["plain train-mode forward"])
        print(f"\n{order}: {type(model).__name__}, {len(bn_layers(model))} BN layers, {sum(len(b) for b in batches)} "
              f"samples in {len(batches)} batches, max |mean|/std at a BN input {mean_to_std(exact):.3g}")
        print(f"{'method':<26} {'wall (ms)':>10} {'vs plain':>9} {'cpu vs plain':>13} {'max rel err mean':>17} "
              f"{'max rel err var':>16} {'var':>7}")
        for name in methods:
            t, tc = min(wall[name]), min(cpu[name])
            em, ev = errors[name] if name != "plain train-mode forward" else (float("nan"), float("nan"))
            print(f"{name:<26} {1e3 * t:>10.1f} {t / base:>9.3f} {tc / base_cpu:>13.3f} {em:>17.2e} {ev:>16.2e} "
                  f"{convention[name] if name != 'plain train-mode forward' else '':>7}")


if __name__ == "__main__":
    main()
