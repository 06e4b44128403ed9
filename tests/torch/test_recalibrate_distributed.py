"""recalibrate under torch.distributed: 2 gloo ranks on CPU, unequal shards.

Each rank runs in its own Python process (this file, run as a script) and saves
its buffers; the oracle is a single-process recalibration over the union of the
shards, which the test has already checked against float64 NumPy in
test_recalibrate.py.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

# Unequal batch sizes and unequal numbers of batches per rank.
SHARDS = {0: (5, 9, 3), 1: (12,)}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU(),  # would need a collective per batch if left as is
        nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6, momentum=None),
    )
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_batches_tracked.fill_(100)
    return model.eval()


def ddp_ready_model() -> nn.Module:
    """make_model without its SyncBatchNorm, which DDP takes only on GPU modules."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 6),
                         nn.BatchNorm1d(6)).eval()


def permuted_model() -> nn.Module:
    """make_model's BN widths in another order (6, 4, 3 for 3, 4, 6): statistics of the same total size."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.BatchNorm1d(3)).eval()


def shard(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [7.0 + 2.0 * torch.randn(n, 1, 8, 8, generator=g) for n in SHARDS[rank]]


FAR = 1e8


def far_shard(rank: int) -> list[torch.Tensor]:
    """Batches 1e8 from 0, their means half a std apart across the ranks (each differs from FAR exactly)."""
    g = torch.Generator().manual_seed(200 + rank)
    return [FAR + 0.5 * rank + torch.randn(16, 2, generator=g, dtype=torch.float64) for _ in range(2)]


def _worker(rank: int, store: str, out: str) -> None:
    """One rank: recalibrate its shard, then the two failure cases; write what happened to ``out``."""
    import torch.distributed as dist

    from bnkit.torch import recalibrate

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = make_model()
        report = recalibrate(model, shard(rank), progress=False)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["report"] = torch.tensor([report.batches, report.world_size, report.layers[0].samples])
        results = {"state": state}

        batches = shard(rank)
        if rank == 1:
            batches[0][0, 0, 0, 0] = float("nan")
        try:
            recalibrate(model, batches, progress=False)
        except ValueError as exc:
            results["nonfinite"] = str(exc)

        def forward(m: nn.Module, batch: torch.Tensor) -> None:
            if rank == 0 and batch.shape[0] == 9:
                raise KeyError("broken batch")
            m(batch)

        try:
            recalibrate(model, shard(rank), forward=forward, progress=False)
        except Exception as exc:  # noqa: BLE001 - record what each rank saw
            results["failure"] = f"{type(exc).__name__}: {exc}"

        class Unstartable:  # a DataLoader whose workers fail to start: iter() raises
            def __iter__(self):
                raise OSError("loader workers failed to start")

        try:
            recalibrate(model, Unstartable() if rank == 1 else shard(rank), num_batches=2, progress=False)
        except Exception as exc:  # noqa: BLE001 - record what each rank saw
            results["iter_failure"] = f"{type(exc).__name__}: {exc}"
        # each rank's statistics finite, their merge beyond float64 (means of +-1e154): a plain ValueError without
        # the layer's name on every rank, where one process raises StatisticsRangeError
        big = nn.Sequential(nn.BatchNorm1d(2)).double().eval()
        before_big = {k: v.clone() for k, v in big.state_dict().items()}
        g = torch.Generator().manual_seed(rank)
        try:
            recalibrate(big, [(1e154 if rank == 0 else -1e154) + torch.randn(8, 2, dtype=torch.float64, generator=g)],
                        progress=False)
        except Exception as exc:  # noqa: BLE001 - record what each rank saw
            results["overflow"] = f"{type(exc).__name__}: {exc}"
        results["overflow_unchanged"] = all(torch.equal(v, before_big[k]) for k, v in big.state_dict().items())
        far = nn.Sequential(nn.BatchNorm1d(2)).double().eval()  # each rank shifts by its own first values
        recalibrate(far, far_shard(rank), progress=False)
        results["far"] = {k: v.clone() for k, v in far.state_dict().items()}
        # a DDP-wrapped model with no batches on rank 1: DDP's own forward begins with a buffer broadcast that
        # rank 1 would never join (both ranks waited for the timeout); the pass runs the module inside
        ddp = nn.parallel.DistributedDataParallel(ddp_ready_model())
        recalibrate(ddp, shard(0) if rank == 0 else [], progress=False)
        results["ddp"] = {k: v.clone() for k, v in ddp.module.state_dict().items()}
        results["unchanged"] = all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        if rank == 0:  # one rank alone (e.g. under `if rank == 0:`): no collective, so no wait for rank 1
            alone = make_model()
            recalibrate(alone, shard(0), progress=False, distributed=False)
            results["alone"] = alone.state_dict()
        dist.barrier()
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_unequal_shards_match_the_union(tmp_path: Path):
    from bnkit.torch import recalibrate

    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); " \
           "import test_recalibrate_distributed as t; t._worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(rank), str(tmp_path / "store"), str(tmp_path / f"{rank}.pt")],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1)]

    union = make_model()
    recalibrate(union, shard(0) + shard(1), progress=False)
    expected = union.state_dict()
    for res in results:
        state = res["state"]
        assert state["report"].tolist() == [4, 2, 29]
        for key, value in expected.items():
            if key.endswith(("running_mean", "running_var")):
                torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=key)
            elif key.endswith("num_batches_tracked") and not key.startswith("8."):
                # training on the shards counts each rank's own calls (3 and 1): one value, the larger, on both
                assert int(state[key]) == 100 + 3 and int(value) == 100 + 4, key
            else:  # weights untouched; the cumulative average (momentum=None) counts the union's 4 batches
                assert torch.equal(state[key], value), key
    for key in expected:  # every rank ends with identical buffers
        assert torch.equal(results[0]["state"][key], results[1]["state"][key]), key

    # a NaN batch on rank 1 raises on both ranks, naming the layer and the rank; nothing changes
    for res in results:
        assert "'1'" in res["nonfinite"] and "batch 0 on rank 1" in res["nonfinite"]
        assert res["unchanged"]
    # any other error on one rank: re-raised there, RuntimeError on the other, no hang
    assert results[0]["failure"] == "KeyError: 'broken batch'"
    assert results[1]["failure"].startswith("RuntimeError: recalibration failed on rank(s) [0]")
    # also when it comes from iter(data) (num_batches= used to take it outside the pass: rank 0 waited for the
    # process group's timeout)
    assert results[1]["iter_failure"] == "OSError: loader workers failed to start"
    assert results[0]["iter_failure"].startswith("RuntimeError: recalibration failed on rank(s) [1]")
    for res in results:
        assert res["overflow"].startswith("StatisticsRangeError: BatchNorm layer '0': its statistics overflow")
        assert res["overflow_unchanged"]
    # far from 0 (|mean|/std 1e8), the ranks' means merged on one shift: the union's variance to 1e-12 (oracle: the
    # data less FAR, exact, in float64 NumPy; a rank's mean rounded at 1e8 put 1e-7 of error into it)
    exact = torch.cat([b - FAR for rank in (0, 1) for b in far_shard(rank)]).numpy()
    for res in results:
        torch.testing.assert_close(res["far"]["0.running_var"], torch.from_numpy(exact.var(0, ddof=1)), rtol=1e-12,
                                   atol=0)
    # DDP with an empty shard on rank 1: both ranks end with rank 0's shard's statistics
    only0 = ddp_ready_model()
    recalibrate(only0, shard(0), progress=False)
    for res in results:
        for key, value in only0.state_dict().items():
            torch.testing.assert_close(res["ddp"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    # distributed=False: rank 0's own shard only, as a single process would compute it
    local = make_model()
    recalibrate(local, shard(0), progress=False)
    for key, value in local.state_dict().items():
        assert torch.equal(results[0]["alone"][key], value), key


# Failure cases: a short process-group timeout, so that a rank left waiting in a collective fails within seconds
# (and the launcher's own timeout kills what still hangs) instead of stalling the suite.
PG_TIMEOUT_S = 10


def _failure_worker(case: str, rank: int, world: int, store: str, out: str) -> None:
    """One rank of a failure case: what recalibrate raised, how long it took, whether the model changed, and
    whether the ranks still meet in a barrier afterwards (every rank left the same collectives behind)."""
    import time

    import torch.distributed as dist

    from bnkit.torch import recalibrate

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        dist.barrier()  # connections made before the clock starts
        results = {}
        for sub in case.split("+"):
            model = make_model() if rank == 0 or not sub.startswith("permuted") else permuted_model()
            before = {k: v.clone() for k, v in model.state_dict().items()}
            modes = [m.training for m in model.modules()]
            data, forward = shard(rank % 2), None  # a third rank gets a copy of rank 0's shard
            kwargs = {}
            if sub == "num_batches":  # half of each rank's batches: 0 on rank 1, which has one
                kwargs["num_batches"] = len(data) // 2
            elif sub == "tensor_data" and rank == 0:
                data = data[0]
            elif sub == "permuted_nan" and rank == 1:
                data[0][0, 0, 0, 0] = float("nan")
            elif sub == "error_and_nan":
                if rank == 1:
                    data[0][0, 0, 0, 0] = float("nan")

                def forward(m: nn.Module, batch: torch.Tensor) -> None:
                    if rank == 0:
                        raise KeyError("broken batch")
                    m(batch)
            start = time.monotonic()
            try:
                recalibrate(model, data, forward=forward, progress=False, **kwargs)
                raised = "nothing"
            except Exception as exc:  # noqa: BLE001 - record what each rank saw
                raised = f"{type(exc).__name__}: {exc}"
                notes = getattr(exc, "__notes__", [])
                results[sub + ":notes"] = " ".join(notes)
            results[sub] = raised
            results[sub + ":seconds"] = time.monotonic() - start
            results[sub + ":unchanged"] = (all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
                                           and [m.training for m in model.modules()] == modes)
        dist.barrier()
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _run_ranks(case: str, world: int, tmp_path: Path, timeout: float = 60.0) -> list[dict]:
    """Run ``_failure_worker(case)`` on ``world`` gloo ranks; kill them all if they outlast ``timeout``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); " \
           "import test_recalibrate_distributed as t; " \
           "t._failure_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, case, str(rank), str(world), str(tmp_path / "store"),
                          str(tmp_path / f"{rank}.pt")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for rank in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        raise AssertionError(f"ranks still running after {timeout}s (a rank waits in a collective)") from None
    assert [p.returncode for p in procs] == [0] * world, "\n".join(logs)
    return [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(world)]


def test_an_input_check_failing_on_one_rank_raises_on_every_rank_at_once(tmp_path: Path):
    # num_batches=len(shard)//2 is 0 on rank 1 (one batch): rank 1 used to raise before the collective, and rank 0
    # waited there until the process group's timeout; so did a tensor passed as data on rank 0
    results = _run_ranks("num_batches+tensor_data", 2, tmp_path)
    assert results[1]["num_batches"] == "ValueError: num_batches must be a positive integer or None, got 0"
    assert results[0]["num_batches"].startswith("RuntimeError: recalibration failed on rank(s) [1]")
    assert results[0]["tensor_data"].startswith("TypeError: data must be an iterable of batches")
    assert results[1]["tensor_data"].startswith("RuntimeError: recalibration failed on rank(s) [0]")
    for res in results:
        for case in ("num_batches", "tensor_data"):
            assert res[case + ":seconds"] < PG_TIMEOUT_S / 2, res
            assert res[case + ":unchanged"], case


def test_an_error_on_one_rank_is_not_replaced_by_another_ranks_nonfinite_batch(tmp_path: Path):
    # rank 0: an exception of its own; rank 1: a NaN batch; rank 2: nothing wrong. Rank 0 used to raise rank 1's
    # ValueError, its own KeyError lost
    results = _run_ranks("error_and_nan", 3, tmp_path)
    assert results[0]["error_and_nan"] == "KeyError: 'broken batch'"
    if sys.version_info >= (3, 11):  # exception notes
        assert "rank 1 had a non-finite BatchNorm input too, in its batch 0" in results[0]["error_and_nan:notes"]
    for res in results[1:]:  # the documented non-finite error (a ValueError), which also names the rank that failed
        assert res["error_and_nan"].startswith("StatisticsRangeError: non-finite (NaN/Inf) input to BatchNorm "
                                               "layer '1' in batch 0 on rank 1")
        assert "Recalibration also failed on rank(s) [0]" in res["error_and_nan"]
    for res in results:
        assert res["error_and_nan:unchanged"]
        assert res["error_and_nan:seconds"] < PG_TIMEOUT_S / 2


def test_ranks_with_other_models_of_the_same_statistics_size_are_refused_before_anything_else(tmp_path: Path):
    """Rank 1 holds make_model's BN widths in another order: its statistics have the same size, and the ranks'
    statistics were merged layer by layer into nonsense (or a 'negative M2' error); with a NaN batch there too,
    rank 0 named its own layer by rank 1's index (an IndexError where it had fewer layers). Both ranks now refuse
    the different models first."""
    results = _run_ranks("permuted+permuted_nan", 2, tmp_path)
    for res in results:
        for case in ("permuted", "permuted_nan"):
            assert res[case].startswith("ValueError: ranks hold models with different BatchNorm layers"), res[case]
            assert res[case + ":unchanged"] and res[case + ":seconds"] < PG_TIMEOUT_S / 2, case
