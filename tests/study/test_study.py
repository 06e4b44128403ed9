"""Units of bnkit.study checked against independent oracles: PyTorch's own BN, float64 NumPy, closed forms."""
import collections
import copy
import json
import os

import numpy as np
import pytest
import torch

from bnkit.study import Context, run_chapters
from bnkit.study import running as ch_running
from bnkit.study.finetune import lesson_freeze
from bnkit.study.models import bn_legend, bn_places, digits_mlp, layernorm_mlp
from bnkit.study.modes import _remainder_example, train_mode_logits
from bnkit.study.report import Chapter, Table, write_report
from bnkit.study.train import batches, population_stats, predict, preserved_modes
from bnkit.torch.modules import bn_layers


def test_batches_cover_everything_and_merge_a_remainder_of_at_most_half_a_batch():
    parts = batches(17, 4)
    assert [len(p) for p in parts] == [4, 4, 4, 5]
    for n in range(1, 90):
        for bs in range(1, 40):
            sizes = [len(p) for p in batches(n, bs)]
            assert sum(sizes) == n and all(s == bs for s in sizes[:-1])
            assert n < bs or bs / 2 < sizes[-1] <= 1.5 * bs, (n, bs, sizes)
    # the digits training set: 1347 = 42 * 32 + 3; a 3-image step at momentum 0.5 ended every epoch of chapter 1
    assert [len(p) for p in batches(1347, 32)][-2:] == [32, 35]
    assert [len(p) for p in batches(1347, 128)][-1] == 67  # more than half a batch stays a batch
    # chapter 2's table says so, with the largest batch size whose remainder joins: 450 = 6 * 64 + 66
    assert _remainder_example(450, (1, 2, 8, 64)) == ": 450 images at batch 64 are 6 passes of 64 and one of 66"
    assert _remainder_example(448, (1, 2, 8, 64)) == ""  # every pass whole
    assert torch.equal(torch.cat(parts), torch.arange(17))
    shuffled = torch.cat(batches(17, 4, generator=torch.Generator().manual_seed(1)))
    assert sorted(shuffled.tolist()) == list(range(17))
    assert [len(p) for p in batches(3, 1)] == [1, 1, 1]
    with pytest.raises(ValueError, match="batch_size"):
        batches(5, 0)


def test_train_mode_logits_match_pytorch_and_collapse_at_one(trained):
    model, x, _ = trained
    state = copy.deepcopy(model.state_dict())
    # batch 2: PyTorch's own training-mode forward is the oracle
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = torch.cat([ref(x[i:i + 2]) for i in range(0, len(x), 2)])
    assert torch.allclose(train_mode_logits(model, x, 2), expected, atol=1e-6)
    # batch 1: every BN outputs beta (up to the kernel's rounding of x - mean), so the network is the same constant
    # for every input; the closed form below is the oracle, and the kernel, not a formula of bnkit's, gives `one`
    one = train_mode_logits(model, x, 1)
    const = copy.deepcopy(model).eval()
    for _, bn in bn_layers(const):
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.data.zero_()  # gamma * 0 + beta
    with torch.no_grad():
        assert torch.allclose(one, const(x), atol=1e-4)
    assert (one - one[0]).abs().max() < 1e-4
    # the model is left as found: eval mode, same buffers
    assert not any(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_predict_in_train_mode_restores_buffers_and_mixed_flags(trained):
    model, x, _ = trained
    model.train()
    model.fc1.eval()  # a mix of modes, as a user may leave it
    flags = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.named_buffers()}
    predict(model, x, batch_size=32, train_mode=True)
    predict(model, x, batch_size=32)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    with pytest.raises(RuntimeError), preserved_modes(model):
        model.eval()
        raise RuntimeError("boom")
    assert {n: m.training for n, m in model.named_modules()} == flags
    model.eval()


def test_population_stats_are_the_float64_moments_of_each_bn_input(trained):
    model, x, _ = trained
    stats = population_stats(model, x)
    w, b = model.fc1.weight.detach().double().numpy(), model.fc1.bias.detach().double().numpy()
    h = x.double().numpy() @ w.T + b  # input of the first BN layer, in float64
    assert list(stats) == ["bn1", "bn2"]
    mean, var = stats["bn1"]
    np.testing.assert_allclose(mean, h.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, h.var(0), rtol=1e-5, atol=1e-6)
    # the second BN layer's input: first BN normalizes with the whole set's statistics
    z = np.maximum((h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * model.bn1.weight.detach().double().numpy()
                   + model.bn1.bias.detach().double().numpy(), 0)
    h2 = z @ model.fc2.weight.detach().double().numpy().T + model.fc2.bias.detach().double().numpy()
    np.testing.assert_allclose(stats["bn2"][0], h2.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["bn2"][1], h2.var(0), rtol=1e-4, atol=1e-5)


def test_worked_example_matches_the_closed_form():
    table, data, findings, checks = ch_running.worked_example()
    r3 = 0.9 * (0.9 * 0.42 + 0.38) + 0.41
    r10 = 0.9**7 * r3 + 4.0 * (1 - 0.9**7)
    assert data["running"][2] == pytest.approx(r3, abs=1e-12)
    assert data["running"][9] == pytest.approx(r10, abs=1e-12)
    assert data["bias_corrected"][9] == pytest.approx(r10 / (1 - 0.9**10), abs=1e-12)
    assert data["lesson_right"]["10"] is False and data["lesson_right"]["3"] is True
    # first batch t with r_t >= 3.58: r_t = 4 + (r3 - 4) * 0.9**(t - 3)
    expected_t = next(t for t in range(4, 200) if 4 + (r3 - 4) * 0.9 ** (t - 3) >= 3.58)
    assert data["batches_to_reach_lesson_value_at_10"] == expected_t
    assert all(checks.values())
    assert any("2.609" in f for f in findings)


def test_lesson_freeze_is_undone_by_train(trained):
    model = copy.deepcopy(trained[0])
    lesson_freeze(model)
    assert all(not bn.training and not bn.weight.requires_grad for _, bn in bn_layers(model))
    model.train()
    assert all(bn.training for _, bn in bn_layers(model))


def test_layernorm_reference_has_no_batch_statistics():
    model = layernorm_mlp()
    assert not bn_layers(model)
    x = torch.rand(5, 64)
    model.train()
    with torch.no_grad():
        full = model(x)
        assert torch.allclose(torch.cat([model(x[i:i + 1]) for i in range(5)]), full, atol=1e-6)


def test_context_rejects_bad_sizes():
    with pytest.raises(ValueError, match="size"):
        Context(size="huge").params(ch_running.SIZES)
    with pytest.raises(ValueError, match="seeds"):
        Context(seeds=0).params(ch_running.SIZES)


def test_run_chapters_refuses_a_seed_numpy_cannot_take_before_running(tmp_path):
    for seed in (-1, 2**32 - 1):  # fine-tuning adds up to 1000 to the seed
        with pytest.raises(ValueError, match="seed must be between 0 and"):
            run_chapters(["fine-tuning"], Context(size="quick", seed=seed, out=tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="unknown chapter"):
        run_chapters(["nope"], Context())


def test_missing_api_makes_a_chapter_unavailable_and_an_error_makes_it_failed(tmp_path, monkeypatch):
    from bnkit.study import modes

    monkeypatch.setattr(modes, "REQUIRES", ("no_such_function",))
    (ch,) = run_chapters(["two-modes"], Context(size="quick", out=tmp_path))
    assert ch.status == "unavailable" and "no_such_function" in ch.reason and not ch.checks
    monkeypatch.setattr(modes, "REQUIRES", ())

    def boom(ctx):
        raise RuntimeError("kaputt")

    monkeypatch.setattr(modes, "run", boom)
    (ch,) = run_chapters(["two-modes"], Context(size="quick", out=tmp_path))
    assert ch.status == "failed" and "kaputt" in ch.reason and "traceback" in ch.data

    def bad_value(ctx):  # any exception, not only a RuntimeError: the later chapters still run
        raise ValueError("no such value")

    from bnkit.study import finetune

    monkeypatch.setattr(modes, "run", bad_value)
    monkeypatch.setattr(finetune, "run", lambda ctx: Chapter(4, "fine-tuning", "t", "c"))
    failed, later = run_chapters(["two-modes", "fine-tuning"], Context(size="quick", out=tmp_path))
    assert failed.status == "failed" and failed.reason == "ValueError: no such value"
    assert later.name == "fine-tuning" and later.status == "ok"


def test_report_is_plain_json_and_tables_check_their_width(tmp_path):
    t = Table("t", ["a", "b"])
    with pytest.raises(ValueError, match="2 columns"):
        t.add(1)
    t.add("x|y", 2)
    ch = Chapter(1, "c", "Title <b>", "claim", tables=[t], checks={"it holds": True},
                 data={"nan": float("nan"), "arr": np.arange(3), "n": np.float32(1.5)})
    paths = write_report([ch], tmp_path, {"size": "quick"})
    results = json.loads(paths["json"].read_text())
    assert results["chapters"]["c"]["data"] == {"nan": None, "arr": [0, 1, 2], "n": 1.5}
    assert "Title &lt;b&gt;" in paths["html"].read_text()
    assert "x\\|y" in paths["markdown"].read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    old_umask = os.umask(0o022)
    try:  # the report is for reading: 0o666 & ~umask like any file, not mkstemp's private 0o600
        write_report([ch], tmp_path, {"size": "quick"})
    finally:
        os.umask(old_umask)
    assert [p.stat().st_mode & 0o777 for p in paths.values()] == [0o644] * 3
    with pytest.raises(TypeError):
        write_report([Chapter(1, "c", "t", "c", data={"bad": object()})], tmp_path, {})
    assert json.loads(paths["json"].read_text()) == results  # a failed write leaves the old report whole


def test_digits_mlp_is_the_zoo_mlp_with_named_layers():
    from bnkit.torch.zoo import MLP

    torch.manual_seed(3)
    zoo = MLP()
    torch.manual_seed(3)
    named = digits_mlp()
    # same architecture and, for a seed, the same initial weights; only the names differ
    assert [type(m) for m in zoo] == [type(m) for m in named]
    assert all(torch.equal(a, b) for a, b in zip(zoo.state_dict().values(), named.state_dict().values()))
    assert [n for n, _ in bn_layers(named)] == ["bn1", "bn2"]
    assert bn_places(named) == {"bn1": "after fc1 (Linear 64->128)", "bn2": "after fc2 (Linear 128->64)"}
    assert bn_legend(named).startswith("bn1 = BatchNorm1d after fc1")
    ln = layernorm_mlp()
    assert [n for n, m in ln.named_children() if isinstance(m, torch.nn.LayerNorm)] == ["ln1", "ln2"]


def test_shifted_domain_is_the_scanner_it_describes():
    from bnkit.study.data import SHIFT_BACKGROUND, SHIFT_CONTRAST, SHIFT_NOISE_STD, shifted_domain

    x = torch.rand(500, 64)
    a, b = shifted_domain(x, seed=4), shifted_domain(torch.zeros_like(x), seed=4)
    assert torch.equal(a, shifted_domain(x, seed=4))  # seeded
    assert torch.allclose(a - b, SHIFT_CONTRAST * x, atol=1e-6)  # same noise, so the difference is the contrast
    assert float(b.mean()) == pytest.approx(SHIFT_BACKGROUND, abs=0.01)
    assert float(b.std()) == pytest.approx(SHIFT_NOISE_STD, rel=0.05)


def test_fixed_seeds_make_a_chapter_reproducible(tmp_path):
    first, second = (run_chapters(["fine-tuning"], Context(size="quick", out=tmp_path / str(i)))[0] for i in range(2))
    assert first.status == "ok"
    assert json.dumps(first.data, sort_keys=True) == json.dumps(second.data, sort_keys=True)
    assert first.tables == second.tables
    other = run_chapters(["fine-tuning"], Context(size="quick", seed=1, out=tmp_path / "s1"))[0]
    assert json.dumps(other.data, sort_keys=True) != json.dumps(first.data, sort_keys=True)  # the seed matters


def test_convergence_ends_with_the_trained_model_the_test_accuracy_is_of():
    """The last distance is measured after the last optimizer step, even when ``every`` does not divide it."""
    from bnkit.study.data import load_digits_split

    steps = len(batches(len(load_digits_split(seed=0).x_train), 64))  # one epoch
    every = next(k for k in range(5, steps) if steps % k)  # the last step is not a measuring step
    p = {"seeds": 1, "epochs": 1, "batch_size": 64, "every": every, "momenta": (0.1,)}
    (trace,) = ch_running.convergence(Context(size="quick"), p)["0.1"]
    assert trace["step"] == list(range(every, steps, every)) + [steps]


def test_stat_shift_is_the_absolute_log_variance_ratio_and_the_mean_shift_in_reference_stds():
    """Doubling one channel's variance and halving another's is a shift of ln 2 each: signed logs would cancel."""
    from bnkit.study.train import stat_shift

    ref_mean, ref_var = np.array([1.0, -2.0]), np.array([4.0, 0.25])
    mean_shift, log_var = stat_shift(ref_mean, ref_var, ref_mean + [2.0, -0.25], ref_var * [2.0, 0.5], 0.0)
    assert log_var == pytest.approx(np.log(2.0), abs=1e-12)
    assert mean_shift == pytest.approx((2.0 / 2.0 + 0.25 / 0.5) / 2, abs=1e-12)
    # eps enters both sides: (v + eps) / (v_ref + eps)
    assert stat_shift(ref_mean, ref_var, ref_mean, np.array([3.0, 0.0]), 1.0)[1] == pytest.approx(
        (abs(np.log(4.0 / 5.0)) + abs(np.log(1.0 / 1.25))) / 2, abs=1e-12)


def test_worked_example_check_fails_when_the_real_layer_disagrees_with_the_exact_ema(monkeypatch):
    """The check "nn.BatchNorm1d equals the exact EMA" must be measured, not assumed: a layer 1e-9 off fails it."""
    real = ch_running._torch_running_means

    def off(series, momentum):
        out = real(series, momentum)
        out[4] += 1e-9
        return out

    monkeypatch.setattr(ch_running, "_torch_running_means", off)
    _, data, _, checks = ch_running.worked_example()
    assert data["max_abs_diff_torch_vs_exact"] == pytest.approx(1e-9, rel=1e-3)
    assert [k for k, ok in checks.items() if not ok] == ["nn.BatchNorm1d's running_mean equals the exact EMA column"]


# Each chapter's verdicts must follow from its measurements. The measuring functions (which train models) are
# replaced by hand-made results: healthy ones, for which every check holds, and ones with one measurement broken,
# for which exactly the check about it must fail.

def _modes_seed(spread=0.0, acc_one=0.1, flag=False, same=True, eval_diff=1e-7):
    bss = (1, 2, 8, 64)
    ev = {bs: {"accuracy": 0.9, "max_abs_diff_vs_full_batch": 1e-7, "same_predictions": True} for bs in bss}
    ev[8] = {"accuracy": 0.9, "max_abs_diff_vs_full_batch": eval_diff, "same_predictions": same}
    tr = {bs: {"accuracy": 0.85, "max_abs_diff_vs_eval": 0.5, "distinct_outputs": 10, "output_spread": 3.0}
          for bs in bss}
    tr[1] = {"accuracy": acc_one, "max_abs_diff_vs_eval": 4.0, "distinct_outputs": 1, "output_spread": spread}
    return {"eval": ev, "train": tr, "flags_after": {"": False, "fc1": flag, "bn1": False}}


@pytest.mark.parametrize("broken,failing", [
    ({}, None),
    ({"spread": 1e-3}, "training mode at batch size 1 gives the same output for every image"),
    ({"acc_one": 0.5}, "training mode at batch size 1 is at chance level (accuracy <= 0.2)"),
    ({"flag": True}, "every module's train/eval flag is as before after scoring"),
    ({"same": False}, "eval mode gives the same predictions at every batch size"),
    ({"eval_diff": 2e-5}, "eval-mode logits agree across batch sizes to 1e-5"),
], ids=["healthy", "spread", "accuracy", "flags", "eval_predictions", "eval_logits"])
def test_two_modes_verdicts_follow_from_the_measurements(tmp_path, monkeypatch, broken, failing):
    from types import SimpleNamespace

    from bnkit.study import modes

    digits = SimpleNamespace(x_test=torch.zeros(20, 64), y_test=torch.arange(20) % 10)
    monkeypatch.setattr(modes, "load_digits_split", lambda seed: digits)
    # two seeds, only the second one broken: a check is about every seed
    monkeypatch.setattr(modes, "_one_seed", lambda d, p, seed, tracker: _modes_seed(**(broken if seed else {})))
    ch = modes.run(Context(size="quick", seeds=2, out=tmp_path))
    assert len(ch.checks) == 5
    assert [k for k, ok in ch.checks.items() if not ok] == ([failing] if failing else [])


def test_two_modes_caption_gives_the_seed_mean_eval_accuracy_not_the_seed_spread(tmp_path, monkeypatch):
    """Eval accuracy 0.90 in one seed and 0.95 in the other, the same at every batch size: the caption said
    '0.900 to 0.950 at every batch size', the seeds' spread read as a spread over batch sizes; the table gives the
    seed mean. Oracle: the mean of the two seeds, 0.925."""
    from types import SimpleNamespace

    from bnkit.study import modes

    def seed_run(d, p, seed, tracker):
        run = _modes_seed()
        for bs in run["eval"]:
            run["eval"][bs]["accuracy"] = 0.95 if seed else 0.90
        return run

    digits = SimpleNamespace(x_test=torch.zeros(20, 64), y_test=torch.arange(20) % 10)
    monkeypatch.setattr(modes, "load_digits_split", lambda seed: digits)
    monkeypatch.setattr(modes, "_one_seed", seed_run)
    (figure,) = modes.run(Context(size="quick", seeds=2, out=tmp_path)).figures
    assert "eval mode 0.925 at every batch size" in figure.caption and "0.900 to" not in figure.caption


def _batch_run(bs, seed, ema_small=0.8, ema_large=0.95, recal=0.82, stray_small=0.5, var_small=0.3, renorm=0.9):
    small = bs == 2
    stray, var = (stray_small, var_small) if small else (0.1, 0.05)
    return {"epochs": 2, "ema": (ema_small if small else ema_large) + 0.01 * (seed - 1),
            "recalibrated": (recal if small else 0.96) + 0.01 * (seed - 1),
            "running_vs_exact_mean_shift_std": {"bn1": stray * 0.5, "bn2": stray * 1.5},
            "running_vs_exact_log_var_ratio": {"bn1": var * 0.5, "bn2": var * 1.5},
            "renorm": renorm if small else 0.96, "layernorm": 0.95 if small else 0.97}


@pytest.mark.parametrize("broken,failing", [
    ({}, None),
    ({"ema_large": 0.78}, "eval accuracy with EMA statistics is lower at batch size 2 than at 32"),
    ({"stray_small": 0.05}, "the running means stray farther from the exact statistics at batch size 2 than at 32"),
    ({"var_small": 0.04}, "the running variances stray farther from the exact statistics at batch size 2 than at 32"),
    ({"recal": 0.79}, "recalibration is no worse than the EMA at batch size 2 (mean over seeds)"),
    # EMA 0.80, LayerNorm 0.95: recalibration at 0.88 recovers 53% of the gap, renorm at 0.9 67%
    ({"recal": 0.88}, "exact statistics recover less than half of the batch-size-2 gap from the EMA to LayerNorm"),
    ({"renorm": 0.81}, "batch renormalization recovers more of that gap than exact statistics"),
], ids=["healthy", "ema", "stray", "var_stray", "recalibrated", "recal_share", "renorm_share"])
def test_batch_size_verdicts_follow_from_the_measurements(tmp_path, monkeypatch, broken, failing):
    from bnkit.study import batchsize, missing_dependencies

    if missing_dependencies(("recalibrate", "convert_bn")):
        pytest.skip("bnkit.torch.recalibrate or convert_bn is not in this build")
    monkeypatch.setattr(batchsize, "load_digits_split", lambda seed: None)
    monkeypatch.setattr(batchsize, "_one", lambda d, bs, p, seed, available, tracker: _batch_run(bs, seed, **broken))
    ch = batchsize.run(Context(size="quick", out=tmp_path))
    assert len(ch.checks) == 7
    assert [k for k, ok in ch.checks.items() if not ok] == ([failing] if failing else [])


def _finetune_seed(lesson_kept=False, freeze_kept=True):
    from bnkit.study.finetune import VARIANTS

    kept = {"pretrained": True, "lesson_freeze": lesson_kept, "freeze_bn": freeze_kept, "recal_only": False}
    return {key: {"acc_A": 0.9, "acc_B": 0.7, "stats_bit_identical": kept.get(key, False),
                  "shift": {n: {"mean_shift_std": 0.0 if kept.get(key, False) else 0.4, "log_var_ratio": 0.1,
                                "max_mean_shift_std": 0.0 if kept.get(key, False) else 1.5}
                            for n in ("bn1", "bn2")}} for key in VARIANTS}


@pytest.mark.parametrize("broken,failing,seeds", [
    ({}, None, "both"),
    ({"lesson_kept": True}, "the lesson's freeze does not survive model.train(): the running statistics changed",
     "both"),
    ({"freeze_kept": False}, "freeze_bn keeps every BN statistic bit-identical through fine-tuning", "both"),
    # freeze_bn keeps the statistics only if it keeps them in every seed
    ({"freeze_kept": False}, "freeze_bn keeps every BN statistic bit-identical through fine-tuning", "second"),
], ids=["healthy", "lesson_freeze", "freeze_bn", "freeze_bn_one_seed"])
def test_fine_tuning_verdicts_follow_from_the_measurements(tmp_path, monkeypatch, broken, failing, seeds):
    from bnkit.study import finetune, missing_dependencies

    if missing_dependencies(("freeze_bn", "recalibrate")):
        pytest.skip("bnkit.torch.freeze_bn or recalibrate is not in this build")
    monkeypatch.setattr(finetune, "_one_seed", lambda p, seed, available, tracker: _finetune_seed(
        **(broken if seed or seeds == "both" else {})))
    ch = finetune.run(Context(size="quick", seeds=2, out=tmp_path))
    assert len(ch.checks) == 2
    assert [k for k, ok in ch.checks.items() if not ok] == ([failing] if failing else [])
    # the prose follows the measurement too: it said the freeze was undone when the statistics were kept (review)
    undone = "The lesson's freeze is undone by model.train()" in ch.findings[1]
    held = "The lesson's freeze held this time" in ch.findings[1]
    assert (undone, held) == ((False, True) if broken.get("lesson_kept") else (True, False)), ch.findings[1]



def test_fine_tuning_finding_gives_the_mean_shift_and_the_largest_channel_shift_over_seeds(tmp_path, monkeypatch):
    """The lesson-freeze finding: the largest layer mean of the channel shifts (mean over seeds), and "up to" the
    largest single channel's shift in any layer and any seed (here 2.5, in bn2 of the second seed only)."""
    from bnkit.study import finetune, missing_dependencies

    if missing_dependencies(("freeze_bn", "recalibrate")):
        pytest.skip("bnkit.torch.freeze_bn or recalibrate is not in this build")

    def one_seed(p, seed, available, tracker):
        out = _finetune_seed()
        out["lesson_freeze"]["shift"] = {
            "bn1": {"mean_shift_std": 0.2, "log_var_ratio": 0.1, "max_mean_shift_std": 0.9},
            "bn2": {"mean_shift_std": 0.3 + 0.2 * seed, "log_var_ratio": 0.1, "max_mean_shift_std": 1.0 + 1.5 * seed}}
        return out

    monkeypatch.setattr(finetune, "_one_seed", one_seed)
    ch = finetune.run(Context(size="quick", seeds=2, out=tmp_path))
    assert ("the running means moved by 0.40 old standard deviations on average over a layer's channels (up to 2.50 "
            "in one channel)") in ch.findings[1], ch.findings[1]


def test_batch_size_table_gives_the_epochs_each_batch_size_trained(tmp_path, monkeypatch):
    """The epochs column is what each batch size's runs trained (more than asked for a large batch, see
    _epochs_for), not the epochs asked for; the variance finding's factor is that of the small batch size."""
    from bnkit.study import batchsize, missing_dependencies

    if missing_dependencies(("recalibrate", "convert_bn")):
        pytest.skip("bnkit.torch.recalibrate or convert_bn is not in this build")
    trained = {2: 2, 8: 3, 32: 5}
    monkeypatch.setattr(batchsize, "load_digits_split", lambda seed: None)
    monkeypatch.setattr(batchsize, "_one", lambda d, bs, p, seed, available, tracker: {
        **_batch_run(bs, seed), "epochs": trained[bs]})
    ch = batchsize.run(Context(size="quick", out=tmp_path))
    assert ch.tables[0].columns[:2] == ["batch", "epochs"]
    assert {row[0]: row[1] for row in ch.tables[0].rows} == {str(bs): str(e) for bs, e in trained.items()}
    # _batch_run's running variances: a mean |log ratio| of 0.3 at batch size 2, a factor exp(0.3) = 1.35
    assert any("off by a mean |log ratio| of 0.300 (a factor 1.35) and 0.050" in f for f in ch.findings), ch.findings


@pytest.mark.parametrize("broken,failing", [
    (None, []),
    ("not folded", ["folding removes every BN layer of the ResNet"]),
    ("folded off", ["the folded model's logits match eval mode to 1e-4",
                    "onnxruntime's logits match PyTorch eval mode to 1e-4 (every ONNX variant)"]),
    ("onnx off", ["onnxruntime's logits match PyTorch eval mode to 1e-4 (every ONNX variant)"]),
    ("not fused", ["onnxruntime runs the BN model as the folded one: its Conv+BN fusion leaves no BN node and the "
                   "folded model's node count; with only that fusion off it runs more nodes"]),
], ids=["healthy", "not_folded", "folded_off", "onnx_off", "not_fused"])
def test_deployment_verdicts_follow_from_the_measurements(tmp_path, monkeypatch, broken, failing):
    """A ResNet with no optimizer step (one training-mode pass fills the running statistics), with folding or
    onnxruntime broken on purpose."""
    import bnkit.torch as bt
    from bnkit.study import deploy, missing_dependencies

    if missing_dependencies(("fold_bn", "export_onnx")):
        pytest.skip("bnkit.torch.fold_bn or export_onnx is not in this build")
    pytest.importorskip("onnxruntime")

    def one_pass(model, x, y, **kwargs):
        model.train()
        with torch.no_grad():
            model(x[:64])
        return 1

    monkeypatch.setattr(deploy, "fit", one_pass)
    monkeypatch.setitem(deploy.SIZES, "quick", {**deploy.SIZES["quick"], "repeats": 1})
    real_fold, real_runner = bt.fold_bn, deploy._ort_runner

    def fold(model, x):
        folded, report = real_fold(model, x)
        if broken == "not folded":  # BN layers left in: the same function, so only the layer count tells
            return copy.deepcopy(model), report
        if broken == "folded off":
            with torch.no_grad():
                list(folded.parameters())[-1].add_(1e-3)  # the logits' bias
        return folded, report

    def runner(path, disabled=()):
        run, fixed, ops = real_runner(path, disabled)
        if broken == "onnx off" and disabled:  # one of the three ONNX variants
            return (lambda x: run(x) + 1e-3), fixed, ops
        if broken == "not fused" and path.stem == "onnx_bn":  # onnxruntime left the BN nodes in the graph it runs
            return run, fixed, ops + collections.Counter(BatchNormalization=6)
        return run, fixed, ops

    monkeypatch.setattr(bt, "fold_bn", fold)
    monkeypatch.setattr(deploy, "_ort_runner", runner)
    ch = deploy.run(Context(size="quick", out=tmp_path))
    assert len(ch.checks) == 4
    assert [k for k, ok in ch.checks.items() if not ok] == failing


def test_noise_floor_is_what_pytorchs_running_mean_keeps_of_batches_drawn_without_replacement():
    """nn.BatchNorm1d fed shuffled epochs of a fixed data set: the channel mean of |running mean - population mean|
    over many steps, in population stds, is the closed-form floor sqrt(2/pi) sqrt(m/(2-m)) sqrt((n-B)/(B(n-1)))."""
    n, b = 4000, 16  # 250 batches an epoch: the EMA's window (1/m steps) spans a small part of one
    data = torch.from_numpy(np.random.default_rng(0).standard_normal((n, 64)) * 3.0 + 1.0)
    mu, sd = data.mean(0), data.std(0, unbiased=False)
    generator = torch.Generator().manual_seed(0)
    for momentum in (0.1, 0.5):
        bn = torch.nn.BatchNorm1d(64, momentum=momentum).double().train()
        errors = []
        with torch.no_grad():
            for epoch in range(12):
                for idx in batches(n, b, generator=generator):
                    bn(data[idx])
                    if epoch >= 1:  # past the window of 1/m steps from the initial 0
                        errors.append(float(((bn.running_mean - mu).abs() / sd).mean()))
        floor = ch_running.noise_floor(momentum, ch_running.independent_spread(n, b))
        assert np.mean(errors) == pytest.approx(floor, rel=0.05), momentum
    assert ch_running.independent_spread(n, n) == 0.0  # the whole set in one batch: no sampling noise at all


def test_batch_mean_spread_of_a_per_sample_layer_is_that_of_independent_samples_and_less_after_a_bn_layer():
    """The first BN of the MLP sees fc1(x), computed per sample: its batch means vary as a sample of B of n does.
    The second sees the first's batch-normalized output: its batch means vary far less."""
    from bnkit.study.data import load_digits_split

    x = load_digits_split(seed=0).x_train[:600]
    torch.manual_seed(0)
    model = digits_mlp().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seqs = ch_running.batch_means(model, x, 20, seed=0)
    spread = {name: ch_running.batch_mean_spread(*seq) for name, seq in seqs.items()}
    assert spread["bn1"] == pytest.approx(ch_running.independent_spread(600, 20), rel=0.1)
    assert spread["bn2"] < spread["bn1"] / 2
    # measured on a copy in training mode: the model keeps its eval flags and its running statistics
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _convergence_traces(p, converged=False, bn1_factor=1.0, bn1_spread=None):
    """Hand-made chapter-1 traces for ``p``'s momenta: bn1 at its noise floor (times ``bn1_factor``), bn2 three
    times its own (lagging), momentum 0.01 far above both; ``converged``: bn2 at momentum 0.5 at a quarter of it."""
    n, b = 1347, p["batch_size"]
    spread = {"bn1": ch_running.independent_spread(n, b) if bn1_spread is None else bn1_spread, "bn2": 0.023}
    true_spread = {"bn1": ch_running.independent_spread(n, b), "bn2": 0.023}
    per_epoch = len(batches(n, b))
    steps = list(range(p["every"], per_epoch * p["epochs"], p["every"])) + [per_epoch * p["epochs"]]
    out = {}
    for m in p["momenta"]:
        layers = {}
        floor = {layer: ch_running.noise_floor(m, true_spread[layer]) for layer in true_spread}
        for layer, factor in (("bn1", bn1_factor), ("bn2", 0.25 if converged and m == 0.5 else 3.0)):
            level = 0.3 if m < 0.1 else floor[layer] * factor
            layers[layer] = {"mean_error": [level] * len(steps), "var_error": [0.1] * len(steps)}
        out[str(m)] = [{"step": steps, "layers": layers, "steps_per_epoch": per_epoch,
                        "batch_mean_spread": spread, "noise_floor": floor, "test_accuracy_eval": 0.95}]
    return out


@pytest.mark.parametrize("broken,failing", [
    ({}, []),
    ({"converged": True}, ["with momentum 0.1, 0.5 every layer's last-epoch mean error stays above 1/2 of its noise "
                           "floor (the running mean does not converge)"]),
    ({"bn1_factor": 3.0}, ["with momentum 0.1, 0.5 bn1's running mean settles at its noise floor: the last epoch's "
                           "mean error is within 2x of it, either way"]),
    ({"bn1_spread": 0.13}, ["bn1's batch means vary as independent samples' do: measured spread within 10% of "
                            "sqrt((n-B)/(B(n-1))) = 0.175"]),
], ids=["healthy", "converged", "bn1_above_floor", "bn1_spread"])
def test_running_stats_verdicts_follow_from_the_measurements(tmp_path, monkeypatch, broken, failing):
    monkeypatch.setattr(ch_running, "convergence", lambda ctx, p: _convergence_traces(p, **broken))
    ch = ch_running.run(Context(size="quick", out=tmp_path))
    assert len(ch.checks) == 5
    assert [k for k, ok in ch.checks.items() if not ok] == failing
    # the floor is the one measured with the run's own batch means (the trace's), whatever the spread reported
    assert ch.data["final"]["0.1"]["bn1"]["noise_floor"] == pytest.approx(
        ch_running.noise_floor(0.1, ch_running.independent_spread(1347, 32)))


def test_bias_corrected_check_fails_when_the_correction_is_wrong(monkeypatch):
    """Dividing by 1 - 0.1**t instead of 1 - 0.9**t leaves the corrected mean at the EMA's lag: the check fails."""
    real = ch_running.ema_table

    def wrong(series, decay, start):
        return [(t, v, run, run / (1 - (1 - decay) ** t)) for t, v, run, _ in real(series, decay, start)]

    monkeypatch.setattr(ch_running, "ema_table", wrong)
    _, _, _, checks = ch_running.worked_example()
    assert [k for k, ok in checks.items() if not ok] == [
        "the bias-corrected mean never strays from 4.0 more than the batch means do"]


# The measuring functions themselves (`_one_seed`, `_one`), run on small data and checked against figures recomputed
# here from the models they trained: the verdict tests above replace them, so a measurement compared with the wrong
# reference, taken on the wrong data or in the wrong mode would otherwise make the chapter's claims hold unseen.

def _small_digits(n_train=300, n_test=150):
    from types import SimpleNamespace

    from bnkit.study.data import load_digits_split

    d = load_digits_split(seed=0)
    return SimpleNamespace(x_train=d.x_train[:n_train], y_train=d.y_train[:n_train], x_test=d.x_test[:n_test],
                           y_test=d.y_test[:n_test])


class _CentredInEval(torch.nn.Module):
    """Subtracts the batch's mean in eval mode only: a model whose eval-mode output depends on the batch and whose
    training mode at batch size 1 does not collapse (it has no BN layer), so every two-modes check has to fail."""

    def forward(self, x):
        return x if self.training else x - x.mean(0, keepdim=True)


def test_two_modes_measurements_are_those_of_the_trained_model(monkeypatch):
    from types import SimpleNamespace

    from bnkit.study import modes

    made = []

    def model():
        made.append(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), _CentredInEval()))
        return made[-1]

    monkeypatch.setattr(modes, "digits_mlp", model)
    digits = _small_digits()
    p = {"epochs": 1, "train_batch": 32, "batch_sizes": (1, 2, 8)}
    out = modes._one_seed(digits, p, 0, SimpleNamespace(advance=lambda: None))
    (net,) = made
    x, y = digits.x_test, digits.y_test
    with torch.no_grad():
        net.eval()
        reference = net(x)
        for bs in p["batch_sizes"]:
            ev = torch.cat([net(x[i]) for i in batches(len(x), bs)])
            assert out["eval"][bs]["accuracy"] == pytest.approx(float((ev.argmax(1) == y).double().mean()))
            assert out["eval"][bs]["max_abs_diff_vs_full_batch"] == pytest.approx(
                float((ev - reference).abs().max()), rel=1e-6)
            assert out["eval"][bs]["same_predictions"] == torch.equal(ev.argmax(1), reference.argmax(1))
        net.train()
        tr = torch.cat([net(x[i:i + 1]) for i in range(len(x))])
    # this model's eval mode at batch 1 predicts class 0 for all: its predictions and logits differ from one batch's
    assert not out["eval"][1]["same_predictions"] and out["eval"][1]["max_abs_diff_vs_full_batch"] > 0.1
    spread = float((tr - tr[0]).abs().max())
    assert spread > 0.1 and out["train"][1]["output_spread"] == pytest.approx(spread, rel=1e-6)
    assert out["train"][1]["distinct_outputs"] == int(torch.unique(tr.argmax(1)).numel())


def test_two_modes_finding_compares_training_mode_with_eval_mode(tmp_path, monkeypatch):
    """The finding "accuracy X at batch 64, against Y in eval mode" must take Y from eval mode (0.9), not training
    mode (0.85)."""
    from types import SimpleNamespace

    from bnkit.study import modes

    digits = SimpleNamespace(x_test=torch.zeros(20, 64), y_test=torch.arange(20) % 10)
    monkeypatch.setattr(modes, "load_digits_split", lambda seed: digits)
    monkeypatch.setattr(modes, "_one_seed", lambda d, p, seed, tracker: _modes_seed())
    ch = modes.run(Context(size="quick", out=tmp_path))
    assert "accuracy 0.850 at batch 2 and 0.850 at batch 64, against 0.900 in eval mode at batch 64" in ch.findings[1]


@pytest.mark.parametrize("leaky", [False, True], ids=["freeze_bn", "leaky_freeze_bn"])
def test_fine_tuning_measurements_are_those_of_each_variant(monkeypatch, leaky):
    """Each variant's accuracies, "stats kept" and shift, recomputed from the model it produced. ``leaky``: a
    freeze_bn that lets the running means move (the counter stays) must be reported as not keeping the statistics."""
    from types import SimpleNamespace

    import bnkit.torch as bt
    from bnkit.study import finetune, missing_dependencies
    from bnkit.study.data import load_digits_split, shifted_domain

    if missing_dependencies(("freeze_bn", "recalibrate")):
        pytest.skip("bnkit.torch.freeze_bn or recalibrate is not in this build")
    if leaky:
        real_freeze = bt.freeze_bn

        def freeze(model, **kwargs):
            real_freeze(model, **kwargs)
            for _, bn in bn_layers(model):
                bn.running_mean.add_(1e-3)
            return model

        monkeypatch.setattr(bt, "freeze_bn", freeze)
    made, real_variant = {}, finetune._variant

    def variant(key, base, *args):
        model = real_variant(key, base, *args)
        made[key] = (copy.deepcopy(base), copy.deepcopy(model))
        return model

    monkeypatch.setattr(finetune, "_variant", variant)
    p = {"pretrain_epochs": 1, "finetune_epochs": 1, "finetune_images": 64, "batch_size": 32}
    out = finetune._one_seed(p, 0, dict.fromkeys(finetune.VARIANTS, True), SimpleNamespace(advance=lambda: None))
    a = load_digits_split(seed=0).subset(finetune.CLASSES)
    b_test = shifted_domain(a.x_test, seed=finetune.B_TEST_SEED)  # domain B's test images for seed 0
    assert set(out) == set(finetune.VARIANTS) == set(made)
    for key, (base, model) in made.items():
        model.eval()
        with torch.no_grad():
            assert out[key]["acc_A"] == pytest.approx(float((model(a.x_test).argmax(1) == a.y_test).double().mean()))
            assert out[key]["acc_B"] == pytest.approx(float((model(b_test).argmax(1) == a.y_test).double().mean()))
        kept = True
        for (name, bn0), (_, bn1) in zip(bn_layers(base), bn_layers(model)):
            kept &= all(torch.equal(getattr(bn0, b), getattr(bn1, b))
                        for b in ("running_mean", "running_var", "num_batches_tracked"))
            m0, v0, m1 = (t.double().numpy() for t in (bn0.running_mean, bn0.running_var, bn1.running_mean))
            # in the pretrained model's standard deviations, as the table says
            assert out[key]["shift"][name]["mean_shift_std"] == pytest.approx(
                np.mean(np.abs(m1 - m0) / np.sqrt(v0 + bn0.eps)), rel=1e-9, abs=1e-12)
            # the largest channel's shift, |.| included: PyTorch's eval-mode BN of the new mean with the old statistics
            moved = torch.nn.functional.batch_norm(bn1.running_mean.double()[None], bn0.running_mean.double(),
                                                   bn0.running_var.double(), training=False, eps=bn0.eps)
            assert out[key]["shift"][name]["max_mean_shift_std"] == pytest.approx(
                float(moved.abs().max()), rel=1e-9, abs=1e-12)
        assert out[key]["stats_bit_identical"] == kept, key
    assert out["pretrained"]["stats_bit_identical"] and not out["lesson_freeze"]["stats_bit_identical"]
    assert out["freeze_bn"]["stats_bit_identical"] is not leaky
    assert out["pretrained"]["acc_A"] != out["pretrained"]["acc_B"]  # the other scanner costs accuracy
    # recalibrating only takes no gradient step; recalibrating then freeze_bn trains with those statistics kept
    base, recal_only = made["recal_only"]
    assert all(torch.equal(u, v) for u, v in zip(base.parameters(), recal_only.parameters()))
    assert not out["recal_only"]["stats_bit_identical"]
    recal_freeze = made["recal_freeze"][1]
    assert not all(torch.equal(u, v) for u, v in zip(base.parameters(), recal_freeze.parameters()))
    if not leaky:
        for (_, bn_f), (_, bn_r) in zip(bn_layers(recal_freeze), bn_layers(recal_only)):
            assert torch.equal(bn_f.running_mean, bn_r.running_mean)
            assert torch.equal(bn_f.running_var, bn_r.running_var)


def test_epochs_for_trains_at_least_the_epochs_and_at_least_min_steps():
    """A large batch gets more epochs, so that it is not simply undertrained (1347 images: 11 steps an epoch at
    batch 128, so 300 steps need 28 epochs); a small one keeps the epochs asked for."""
    from bnkit.study.batchsize import epochs_for

    p = {"epochs": 3, "min_steps": 300}
    assert epochs_for(1347, 128, p) == 28  # ceil(300 / 11)
    assert epochs_for(1347, 2, p) == 3  # 673 steps an epoch
    for n, bs in ((1347, 32), (1347, 64), (500, 100), (97, 200)):
        e, per_epoch = epochs_for(n, bs, p), len(batches(n, bs))
        assert e >= p["epochs"] and e * per_epoch >= p["min_steps"]
        assert e == p["epochs"] or (e - 1) * per_epoch < p["min_steps"]  # no more than needed


def test_batch_size_a_tie_with_layernorm_is_no_gap_to_close(tmp_path, monkeypatch):
    """LayerNorm exactly as accurate as the EMA at batch 2: there is no gap, so "LayerNorm beats the EMA" fails and no
    share of the gap is claimed."""
    from bnkit.study import batchsize, missing_dependencies

    if missing_dependencies(("recalibrate", "convert_bn")):
        pytest.skip("bnkit.torch.recalibrate or convert_bn is not in this build")

    def tied(d, bs, p, seed, available, tracker):
        run = _batch_run(bs, seed)
        if bs == 2:
            run["layernorm"] = run["ema"]
        return run

    monkeypatch.setattr(batchsize, "load_digits_split", lambda seed: None)
    monkeypatch.setattr(batchsize, "_one", tied)
    ch = batchsize.run(Context(size="quick", out=tmp_path))
    assert ch.data["gap_to_layernorm"]["gap"] == 0.0
    assert [k for k, ok in ch.checks.items() if not ok] == [
        "LayerNorm beats the EMA at batch size 2 (there is a gap to close)",
        "exact statistics recover less than half of the batch-size-2 gap from the EMA to LayerNorm",
        "batch renormalization recovers more of that gap than exact statistics"]
    assert any("LayerNorm does not beat the EMA at batch size 2" in f for f in ch.findings)


def test_batch_size_measurements_are_those_of_the_trained_model(monkeypatch):
    """The EMA column is the trained model in eval mode; the stray of its running statistics is measured from the
    exact training-set statistics (float64 here; recalibrate stores the unbiased variance), in their stds."""
    from types import SimpleNamespace

    from bnkit.study import batchsize, missing_dependencies

    if missing_dependencies(("recalibrate",)):
        pytest.skip("bnkit.torch.recalibrate is not in this build")
    made = []

    def model():
        made.append(digits_mlp())
        return made[-1]

    monkeypatch.setattr(batchsize, "digits_mlp", model)
    digits = _small_digits()
    available = {"ema": True, "recalibrated": True, "renorm": False, "layernorm": True}
    out = batchsize._one(digits, 16, {"epochs": 1, "min_steps": 1}, 0, available, SimpleNamespace(advance=lambda: None))
    net = made[0].eval()
    assert out["epochs"] == 1
    with torch.no_grad():
        assert out["ema"] == pytest.approx(float((net(digits.x_test).argmax(1) == digits.y_test).double().mean()))
    h = digits.x_train.double().numpy() @ net.fc1.weight.detach().double().numpy().T \
        + net.fc1.bias.detach().double().numpy()  # bn1's input over the training set
    mu, var = h.mean(0), h.var(0, ddof=1)
    rm, rv, eps = net.bn1.running_mean.double().numpy(), net.bn1.running_var.double().numpy(), net.bn1.eps
    assert out["running_vs_exact_mean_shift_std"]["bn1"] == pytest.approx(
        np.mean(np.abs(rm - mu) / np.sqrt(var + eps)), rel=1e-4)
    assert out["running_vs_exact_log_var_ratio"]["bn1"] == pytest.approx(
        np.mean(np.abs(np.log((rv + eps) / (var + eps)))), rel=1e-4)
