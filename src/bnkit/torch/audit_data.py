"""Depth 3 of :func:`bnkit.torch.audit`: the model run on data.

See :mod:`bnkit.torch.audit` for the math of the shift ranking (``z``, ``L``, KL), the
train-vs-eval gap, the batch-size-1 coupling check and the running statistics' noise.

A layer's score (channel mean of KL) is measured on the moments of ``n`` values per channel, which vary
even when the data is drawn from the running distribution itself: ``n`` independent values give a score
of ``(1/n + ln k - digamma(k)) / 2`` on average, ``k = (n - 1) / 2`` (0.885 at ``n = 2``, 0.46 at 3, 0.11
at 10, about ``1/n`` from 100 on; :func:`sampling_kl`). Layers are ranked and graded on the score less
that expectation, and only where that excess clears the sampling noise too (:data:`SHIFT_NOISE_SDS`), so a
small slice of data does not turn sampling noise into findings.
"""
from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ..audit_state import as_array, ema_noise_factor
from ..findings import Finding
from .audit_batches import Batches, batch_len, batched, default_forward, map_tensors, set_training
from .audit_model import short_names
from .freeze import is_frozen
from .layers import is_cumulative
from .audit_moments import Collector, PassClock, pool_calls
from .modules import (SavedState, eager_calls, flatten_tensors, has_stock_eval_forward, is_batchnorm, normalized_inputs,
                      restored_after_each_call)

if TYPE_CHECKING:
    from .audit import AuditReport

#: Layer shift score (channel-mean KL) less its sampling expectation at or above which the mismatch is an
#: error / a warning (when it also clears SHIFT_NOISE_SDS).
SHIFT_ERROR_KL = 0.5  # z_eq = 1 standard deviation
SHIFT_WARNING_KL = 0.045  # z_eq = 0.3
#: A shift is graded only where its score exceeds ``sampling_kl`` by this many ``sampling_kl_sd`` too: about
#: 2% of single channels drawn from the running distribution do, at any count (one channel's KL is about
#: exponential, whose tail beyond mean + 3 sd is exp(-4)); channels that do not move together, far fewer. It
#: matters below ~70 values per channel, where 3 ``sampling_kl_sd`` exceeds SHIFT_WARNING_KL.
SHIFT_NOISE_SDS = 3.0
#: Relative train-vs-eval output gap above which a warning is raised.
GAP_WARNING = 0.5
#: Batch-1 vs batch-B outputs differing by more than this (relative to max |output|) are coupled.
COUPLING_RTOL = 1e-3
#: Expected running-mean wobble (in running standard deviations) above which a warning is raised.
NOISE_WARNING = 0.1


@dataclass
class LayerShift:
    """How far the data's batch statistics at one layer are from its running statistics.

    ``mean_shift``: ``z`` of the worst channel (signed); ``log_var_ratio``: ``L`` of the
    worst channel (signed); ``score``: channel mean of KL; ``z_eq = sqrt(2 score)``.
    ``mean_noise`` / ``var_noise``: expected standard deviation of the running mean (in
    running standard deviations) and relative one of the running variance at the training
    batch size, root-mean-square over channels (None when fewer than 2 batches were seen, for bnkit's
    ``FrozenBatchNorm*d`` and layers whose statistics ``freeze_bn`` froze, which no longer change, when the
    batches are not random samples, and for a layer some forward called more than once, whose calls differ by
    design, not by sampling; ``var_noise`` also
    when every call saw one sample, which leaves no within-batch spread).
    ``batch_f``: the batch means' ANOVA F ratio (between-batch mean square over the pooled within-batch
    variance), channel median; at most about 1 when the batches are random samples of the data (None when
    fewer than 2 batches were seen, for a layer some forward called more than once, and when every call saw one
    sample).
    ``calls_per_forward``: the most calls one forward made of the layer, empty ones included.
    A layer called more than once per forward (shared, or in a loop) whose calls differ beyond
    sampling noise is compared call by call: its running statistics serve every call in eval mode, so each
    call's inputs, pooled over the batches, are compared with them, and the figures are those of the worst call,
    ``call`` (1-based; None, and all calls pooled, for a layer called once per forward or whose calls differ by
    sampling alone; with too few batches to tell, the worst call where it grades worse than the pool, or alike
    with twice its excess: :func:`_candidate_rank`).
    ``sampling_kl`` / ``sampling_kl_sd``: mean and standard deviation of ``score`` from sampling noise alone,
    for ``count`` independent values per channel drawn from the running distribution (:func:`sampling_kl`;
    the standard deviation is one channel's, the most a channel mean varies however its channels correlate).
    The values of a sample are not independent in a convolution's map: where they move together, as neighbouring
    pixels usually do, the score varies more and these are lower bounds. None below 2 values per channel, which
    leave no variance to compare (not graded). Layers are ranked by
    ``score - sampling_kl``.
    """

    layer: str
    score: float
    z_eq: float
    mean_shift: float
    log_var_ratio: float
    worst_channel: int
    count: int
    mean_noise: float | None = None
    var_noise: float | None = None
    batch_f: float | None = None
    call: int | None = None
    calls_per_forward: int = 1
    sampling_kl: float | None = None
    sampling_kl_sd: float | None = None

    @property
    def excess(self) -> float:
        """``score - sampling_kl``, what the layer is ranked and graded on (``-inf`` when not graded)."""
        return -math.inf if self.sampling_kl is None else self.score - self.sampling_kl


def sampling_kl(count: int) -> tuple[float, float] | tuple[None, None]:
    """Mean and standard deviation of one channel's KL between the moments (unbiased variance) of ``count``
    independent values drawn from a normal distribution and that distribution, ``eps`` aside; (None, None)
    below 2 values.

    ``z^2 n ~ chi2(1)`` and ``R = v_d / v_r ~ Gamma(k, 1/k)``, ``k = (n - 1) / 2``, independent, give
    ``E KL = (1/n + ln k - digamma(k)) / 2`` and ``Var KL = (trigamma(k) - 1/k + 2/n^2) / 4``
    (``Var(R - ln R) = trigamma(k) - 1/k``); both about ``1/n`` for large ``n``.
    """
    if count < 2:
        return None, None
    n, k = float(count), torch.tensor((count - 1) / 2, dtype=torch.float64)
    mean = 0.5 * (1 / n + float(torch.log(k) - torch.special.digamma(k)))
    var = 0.25 * (float(torch.special.polygamma(1, k)) - 1 / float(k) + 2 / n ** 2)
    return mean, math.sqrt(var)



def data_findings(model: nn.Module, layers: list[tuple[str, nn.Module]], batches: Batches,
                  forward: Callable[[nn.Module, Any], Any], train_batch_size: int | None, coupling_samples: int,
                  report: AuditReport) -> list[Finding]:
    """The depth-3 findings; fills ``report.batches``, ``shifts``, ``train_eval_gap`` and ``batch_coupling``.

    ``layers``: BatchNorm layers and bnkit's ``FrozenBatchNorm*d`` (compared with the data like the others).
    """
    tracked = [(n, bn) for n, bn in layers if bn.running_mean is not None and not is_lazy(bn.running_mean)]
    clock = PassClock()  # numbers every BN call of the pass in the order they ran, and knows its batch
    collectors = {n: Collector(bn, clock, n) for n, bn in tracked}
    findings: list[Finding] = []
    who = "the model" if forward is default_forward else "the model or forward="  # in errors of either pass
    # every module's flags, options, attributes, parameters and buffers, put back between the passes and after them;
    # saved with in-place compiled calls set aside, so putting it back between passes keeps them aside
    with eager_calls(model), SavedState(model) as saved, torch.no_grad():
        # pass 1: every BN on batch statistics (nothing it keeps is updated); other modules in eval mode
        set_training(model, False)  # assigned, not model.eval(): a frozen layer's own train() must not run
        own = [(n, bn) for n, bn in tracked if not collectors[n].stock]  # measured on what they hand to F.batch_norm

        def measure(j: int, x: torch.Tensor | None) -> None:
            collectors[own[j][0]].measure(x)

        measured = normalized_inputs([bn for _, bn in own], measure, fallback=measure)  # unreadable inputs counted
        detach = []
        try:
            for n, bn in tracked:
                detach.append(collectors[n].attach(bn))
            for _, bn in own:  # a forward of its own may write its buffers whatever its flags
                detach.append(restored_after_each_call(bn, saved.buffers).remove)
            batch_out, used, alone, counted = None, 0, [], None
            with measured:
                for i, batch in enumerate(batches):
                    size = batch_len(batch)  # None: a batch object bnkit cannot count (forward= reads it)
                    if size is not None and size < 2:  # batch statistics need two samples
                        if size == 1:
                            alone.append(i)
                        if counted is None and not isinstance(batch, torch.Tensor):  # how it was counted
                            counted = (f" (counted on dim 0 of each batch's first tensor, shaped "
                                       f"{tuple(flatten_tensors(batch)[0].shape)} in batch {i}: put the tensor "
                                       "whose dim 0 holds the samples first)")
                        continue
                    clock.start(i, size)
                    try:
                        out = forward(model, batch)
                    except Exception as exc:
                        raise ValueError(f"{who} failed on data batch {i} with BatchNorm on batch statistics: "
                                         f"{type(exc).__name__}: {exc}") from exc
                    if batch_out is None:
                        batch_out, first = flatten_tensors(out), batch
                    used += 1
        finally:
            for undo in detach:
                undo()
        if not used:
            raise ValueError("every data batch has fewer than 2 samples: batch statistics need at least 2"
                             + (counted or ""))
        if alone:
            findings.append(Finding(
                "info", "(data)", "batches of one sample left out",
                f"{len(alone)} data batch(es) of one sample (batch {alone[0]}{', ...' if len(alone) > 1 else ''}) "
                f"were not measured: the audit compares batch statistics of at least 2 samples{counted or ''}",
                "batch the data with the last sample joined to the batch before it", "single_sample_batches",
                {"batches": alone}))
        if unreached := [n for n, _ in tracked if not collectors[n].means and not collectors[n].unmatched]:
            findings.append(Finding(
                "info", unreached[0], "not reached by the data",
                f"the data never reached BatchNorm layer(s) {short_names(unreached)}, so their running statistics are "
                "not compared with it (the state checks still apply)",
                "pass data that runs through them (another branch or head), or forward= calling them",
                "unreached", {"layers": unreached}))
        if uncompared := [n for n, _ in own if collectors[n].unmatched]:
            calls = sum(collectors[n].unmatched for n in uncompared)
            findings.append(Finding(
                "warning", uncompared[0], "not compared with the data",
                f"BatchNorm layer(s) {short_names(uncompared)} have a forward of their own that hands "
                "torch.nn.functional.batch_norm no tensor with their channels on axis 1, and either no single "
                "tensor input (several tensor keywords, a PackedSequence) or one without them there either (such as "
                f"(N, L, C)): {calls} call(s) were not compared with the data",
                "have their forward call torch.nn.functional.batch_norm on the (N, C, ...) tensor, or compare their "
                "running statistics with the data by hand", "own_forward_unread", {"layers": uncompared}))
        if names := [own[j][0] for j in sorted(measured.from_input)]:
            findings.append(Finding(
                "warning", names[0], "compared on its input, not on what it normalizes",
                f"BatchNorm layer(s) {short_names(names)} have a forward of their own that does not hand "
                "torch.nn.functional.batch_norm a tensor with their channels on axis 1 (own arithmetic, or channels "
                "reshaped first), so what they normalize is unknown: their statistics shift is that of their input",
                "check these layers' shift figures against what their forward normalizes", "own_forward",
                {"layers": names}))
        report.batches = used
        # pass 2: the model in eval mode, first batch, then single samples
        saved.restore()
        set_training(model, False)
        suspects = _BatchStatSuspects(layers)
        try:
            with suspects:
                eval_out = flatten_tensors(forward(model, first))
        except Exception as exc:
            raise ValueError(f"{who} failed in eval mode on the first data batch: "
                             f"{type(exc).__name__}: {exc}") from exc
        shift_findings, ordered = _shift_findings(tracked, collectors, train_batch_size or batch_len(first), report)
        findings += _gap_findings(batch_out, eval_out, report, ordered)
        findings += _coupling_findings(model, suspects, first, eval_out, forward, coupling_samples, report)
    return findings + shift_findings


def _shift_findings(tracked, collectors, b_train: int, report: AuditReport) -> tuple[list[Finding], LayerShift | None]:
    """The shift and noise findings, and the layer showing that the batches are not random samples (or None)."""
    shifts, nonfinite = [], []
    for name, bn in tracked:
        col = collectors[name]
        if col.pool().count == 0:
            if col.means:  # called, but NaN or Inf reached it
                nonfinite.append(name)
            continue
        mu_r, var_r = as_array(bn.running_mean), as_array(bn.running_var)
        if not (np.isfinite(mu_r).all() and np.isfinite(var_r).all()) or (var_r + bn.eps <= 0).any():
            continue  # reported by the state checks
        eps = float(bn.eps)
        candidates = []
        for call, count, mu_d, var_d in _call_moments(col):
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # beyond float64: inf, never NaN
                z = (mu_d - mu_r) / np.sqrt(var_r + eps)
                log_ratio = np.log((var_d + eps) / (var_r + eps))
                kl = 0.5 * (np.expm1(log_ratio) - log_ratio + z * z)
            kl[np.isposinf(log_ratio)] = np.inf  # exp(L) - L at L = inf is inf - inf in floating point
            expected, sd = sampling_kl(int(count))
            worst = int(np.argmax(kl))
            candidates.append(LayerShift(name, float(kl.mean()), float(math.sqrt(2 * kl.mean())), float(z[worst]),
                                         float(log_ratio[worst]), worst, int(count), call=call,
                                         sampling_kl=expected, sampling_kl_sd=sd))
        shift = max(candidates, key=_candidate_rank(candidates))
        shift.calls_per_forward = col.calls_per_forward
        if shift.call is None and col.once_per_forward and b_train is not None:  # else its calls differ by design
            shift.mean_noise, shift.var_noise, shift.batch_f = _noise(col, bn, b_train, var_r + eps)
        shifts.append(shift)
    shifts.sort(key=lambda s: (s.excess, s.score), reverse=True)
    report.shifts = shifts
    findings = []
    if nonfinite:
        nonfinite.sort(key=lambda n: collectors[n].first_nonfinite_call())  # the order the forward reached them
        findings.append(Finding(
            "error", nonfinite[0], "non-finite batch statistics on the data",
            f"NaN/Inf in the input, or a variance beyond the input's dtype, in {len(nonfinite)} BatchNorm layer(s) "
            f"(the first reached named; all, in that order: {', '.join(n or '(root)' for n in nonfinite)}); their "
            "statistics are not compared",
            "find where the values blow up before this layer (an overflowing layer, a division by zero), or scale "
            "the input down", "data_nonfinite", {"layers": nonfinite}))
    for rank, s in enumerate(shifts, start=1):
        severity = _shift_severity(s)
        if severity is None:
            continue
        where = "" if s.call is None else f" in its call {s.call} of {s.calls_per_forward} per forward"
        fix = ("the top-ranked layer is where the mismatch starts (layers are measured on batch statistics, so "
               "upstream errors do not propagate): if its statistics were altered, restore them; if this data is "
               "what the model will see, recalibrate (bnkit recalibrate)")
        if s.call is not None:
            fix = ("one set of running statistics serves all its calls in eval mode: if their inputs differ by design "
                   "(a shared layer on two branches, a layer in a loop), give each call its own BatchNorm layer; "
                   "else " + fix)
        findings.append(Finding(
            severity, s.layer, f"running statistics do not match the data (rank {rank})",
            f"like a shift of {s.z_eq:.2f} std per channel{where}; worst channel {s.worst_channel}: mean off by "
            f"{s.mean_shift:+.2f} std, variance x{math.exp(s.log_var_ratio):.3g}; score {s.score:.3g}, of which "
            f"sampling noise gives {s.sampling_kl:.2g} at {s.count} values per channel",
            fix, "stat_shift", asdict(s)))
    findings += _few_values_finding(shifts)
    ordered = _not_random(shifts, collectors, report.batches)
    if ordered is not None:
        for s in shifts:
            s.mean_noise = s.var_noise = None  # measured from the spread between batches: not sampling noise here
        limit = _f_limit(report.batches - 1, _within_dof(collectors[ordered.layer]))
        findings.append(Finding(
            "info", ordered.layer, "running statistics noise not estimated: the data's batches are not random samples",
            f"the batch means spread {ordered.batch_f:.3g} times as much as the within-batch variance predicts "
            f"(ANOVA F, channel median; batches drawn at random give at most about 1, and above {limit:.3g} with "
            f"a chance below one in a million over {report.batches} batches): the data is ordered, e.g. sorted by "
            "class (a DataLoader with shuffle=False), so its batches differ by more than sampling noise; the noise "
            "figure and the train-vs-eval gap assume random batches, and the statistics shifts of the layers after "
            "the first, which see inputs normalized batch by batch, move with the batches too",
            "pass the data shuffled (DataLoader(..., shuffle=True), or x[torch.randperm(len(x))]) to estimate the "
            "noise and the gap and to compare the statistics", "stat_noise",
            {"train_batch_size": b_train, "batch_f": ordered.batch_f, "f_limit": limit, "batches": report.batches}))
        return findings, ordered
    noisy = [s for s in shifts if s.mean_noise is not None]
    bn_of = dict(tracked)
    moving = [bn for s in shifts if is_batchnorm(bn := bn_of[s.layer]) and not is_frozen(bn, "stats")]
    if not noisy and moving:
        if all(bn.momentum is not None and not 0.0 <= bn.momentum < 2.0 for bn in moving):
            why = "each such layer's momentum makes its running average diverge (see the momentum finding)"
            fix = "set the momentum in (0, 1]"
        elif b_train is None:
            why = ("the training batch size is unknown (the data's batches are objects whose samples bnkit cannot "
                   "count)")
            fix = "pass train_batch_size="
        elif report.batches < 2:
            why = f"the data gave {report.batches} batch(es)"
            fix = "pass more data or a smaller batch size"
        else:  # each layer was called more than once in some forward, or reached in fewer than 2 batches
            why = ("no BatchNorm layer was reached in at least 2 of them without a forward calling it more than once "
                   "(a layer called more than once per forward sees inputs that differ by design)")
            fix = ""
        findings.append(Finding(
            "info", "(model)", "running statistics noise not estimated",
            f"it is measured from the spread between data batches and {why} (training batch size {b_train} unused)",
            fix, "stat_noise", {"train_batch_size": b_train, "batches": report.batches}))
    if noisy:
        worst = max(noisy, key=lambda s: s.mean_noise)
        worst_var = max((s for s in noisy if s.var_noise is not None), key=lambda s: s.var_noise, default=None)
        worst_bn = bn_of[worst.layer]
        momentum = "a cumulative average" if is_cumulative(worst_bn) else f"momentum {worst_bn.momentum}"
        findings.append(Finding(
            "warning" if worst.mean_noise > NOISE_WARNING else "info", worst.layer,
            f"running statistics noise at training batch size {b_train}",
            _noise_evidence(worst, worst_var, momentum) + "; measured from the spread between the data's batches, "
            "taken as random samples of it (shuffle=True)",
            "" if worst.mean_noise <= NOISE_WARNING else
            "use larger batches, a smaller momentum, or recompute the statistics after training (bnkit recalibrate)",
            "stat_noise", {"train_batch_size": b_train, "mean_noise": worst.mean_noise,
                           "var_noise": worst_var and worst_var.var_noise,
                           "var_noise_layer": worst_var and worst_var.layer}))
    return findings, None


_GRADES = {None: 0, "warning": 1, "error": 2}


def _candidate_rank(candidates: list[LayerShift]) -> Callable[[LayerShift], tuple]:
    """How a layer's figures (:func:`_call_moments`' entries) are ranked to pick the one reported: the worst graded,
    then the largest excess. Beside the pooled figures (calls that could not be told apart), a call is reported only
    where it is graded worse, or graded alike with twice the excess: chunks of a ghost batch differ by sampling
    alone (more than :func:`sampling_kl` says where a conv map's values move together), a shared layer's shifted
    call by far more than its pool, which the other calls dilute."""
    pooled = any(c.call is None for c in candidates)

    def rank(s: LayerShift) -> tuple:
        grade = _GRADES[_shift_severity(s)]
        if not pooled or s.call is None:
            return grade, s.excess, s.score
        return grade, s.excess / 2 if grade else -math.inf, s.score

    return rank


def _shift_severity(s: LayerShift) -> str | None:
    """A layer's shift graded: ``score - sampling_kl`` against SHIFT_ERROR_KL / SHIFT_WARNING_KL where it also
    exceeds SHIFT_NOISE_SDS ``sampling_kl_sd``; None (no finding) below, or with no sampling figure."""
    if s.sampling_kl is None or s.excess < SHIFT_NOISE_SDS * s.sampling_kl_sd:
        return None
    return "error" if s.excess >= SHIFT_ERROR_KL else "warning" if s.excess >= SHIFT_WARNING_KL else None


def _few_values_finding(shifts: list[LayerShift]) -> list[Finding]:
    """An info finding naming the layers whose data is too small to grade a warning-level shift: their sampling
    noise allowance exceeds SHIFT_WARNING_KL (below ~70 values per channel), or one value per channel."""
    small = [s for s in shifts if s.sampling_kl is None or SHIFT_NOISE_SDS * s.sampling_kl_sd > SHIFT_WARNING_KL]
    if not small:
        return []
    parts, graded = [], [s for s in small if s.sampling_kl is not None]
    if graded:
        fewest = min(graded, key=lambda s: s.count)
        least = math.sqrt(2 * SHIFT_NOISE_SDS * fewest.sampling_kl_sd)
        parts.append(
            f"BatchNorm layer(s) {short_names([s.layer for s in graded])} saw as few as {fewest.count} values per "
            f"channel, where sampling noise alone gives a score (channel mean of KL) of {fewest.sampling_kl:.2g} on "
            f"average, standard deviation {fewest.sampling_kl_sd:.2g}: only shifts beyond about {least:.2g} std per "
            "channel are graded there (more where the values of a sample move together, as in a convolution's map)")
    if ungraded := [s.layer for s in small if s.sampling_kl is None]:
        parts.append(f"BatchNorm layer(s) {short_names(ungraded)} saw one value per channel, which leaves no variance "
                     "to compare: not graded")
    names = [s.layer for s in small]
    return [Finding("info", names[0], "too few values per channel to tell small statistics shifts from sampling noise",
                    "; ".join(parts), "pass more data (the sampling noise shrinks as 1 / values per channel)",
                    "small_data", {"layers": names, "counts": [s.count for s in small]})]


def _call_moments(col: Collector) -> list[tuple[int | None, int, np.ndarray, np.ndarray]]:
    """``(call, count, mean, variance)`` of a layer's inputs per call place within a forward (``call`` 1-based,
    empty calls counted), each pooled over the batches by Chan's formula; one entry, ``call`` None and all its
    calls pooled, for a layer called once per forward, measured at fewer than two places, or whose places do not
    differ beyond sampling noise (:func:`_positions_differ`: a ghost-batch layer called on chunks of its batch).
    Where the batches are too few to tell (a few batches through a layer shared by two branches), the pooled entry
    and one per place (:func:`_candidate_rank` picks), so a shared layer's shifted call is not hidden in the pool.
    The variance is unbiased (biased with one value per channel)."""
    m = col.moments
    pooled = [(None, m.count, m.mean, m.var_unbiased if m.count > 1 else m.var)]
    if col.calls_per_forward <= 1:
        return pooled
    _, counts, means, var = col.stacked()
    # each call's place in its forward, empty calls counted (a routed call given no rows keeps the next call's
    # place), numbered 0.. over the places that were measured
    places, position = np.unique(np.asarray(col.positions), return_inverse=True)
    if len(places) < 2:
        return pooled
    differ = _positions_differ(position, means, np.log(var + col.eps))
    if differ is False:
        return pooled
    out = []
    for k, place in enumerate(places.tolist()):
        total, mean, m2 = pool_calls(counts[position == k], means[position == k], var[position == k])
        out.append((place + 1, total, mean, m2 / (total - 1) if total > 1 else m2 / total))
    return out if differ else pooled + out


#: Above this one-in-a-million F level the positions test has no power: the calls' means would have to differ by
#: about sqrt(2 limit / batches) batch-to-batch standard deviations (2 places over 5 batches: 315, 11 of them).
_DECIDABLE_F = 100.0


def _positions_differ(position: np.ndarray, *per_call: np.ndarray) -> bool | None:
    """Whether a layer's call positions within a forward differ by design: for some statistic (each ``(calls, C)``:
    the calls' means, their log variances), the one-way ANOVA F of the positions, with the batches as
    replicates, channel median, above the one-in-a-million level of :func:`_f_limit`. Calls at one position
    vary between batches by sampling alone, whatever correlates within a sample, so positions drawn alike (chunks
    of a shuffled batch) stay below it. None (cannot tell) where F stays below a level above :data:`_DECIDABLE_F`:
    too few batches per position (one each leaves nothing to test)."""
    positions = int(position.max()) + 1
    sizes = np.bincount(position, minlength=positions)
    within_dof = int((sizes - 1).clip(min=0).sum())
    limit = _f_limit(positions - 1, within_dof) if within_dof > 0 else math.inf
    if not math.isfinite(limit):
        return None
    for stat in per_call:
        groups = [stat[position == k] for k in range(positions)]
        centres = np.stack([g.mean(axis=0) for g in groups])
        within = sum(np.square(g - c).sum(axis=0) for g, c in zip(groups, centres)) / within_dof
        between = sizes @ np.square(centres - sizes @ centres / sizes.sum()) / (positions - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(within > 0, between / within, np.where(between > 0, np.inf, 0.0))
        if float(np.median(f)) > limit:
            return True
    return False if limit <= _DECIDABLE_F else None


#: The standard normal's upper one-in-a-million quantile.
_Z_1E6 = 4.753424


def _f_limit(dof: int, within_dof: float) -> float:
    """The upper one-in-a-million quantile of ``F(dof, within_dof)``, by Paulson's approximation.

    It solves ``((1 - b) f^(1/3) - (1 - a)) / sqrt(b f^(2/3) + a) = z`` with ``a = 2 / (9 dof)``,
    ``b = 2 / (9 within_dof)`` for the larger root (checked against scipy.stats.f.isf in the tests:
    a little above the exact quantile, so the chance stays at most one in a million); ``inf`` (no
    claim) where the approximation has no root, ``within_dof`` below about 6.
    """
    a, b, z2 = 2.0 / (9.0 * dof), 2.0 / (9.0 * within_dof), _Z_1E6 ** 2
    qa, qb, qc = (1.0 - b) ** 2 - z2 * b, -2.0 * (1.0 - a) * (1.0 - b), (1.0 - a) ** 2 - z2 * a
    if qa <= 0.0:
        return math.inf
    return ((-qb + math.sqrt(qb * qb - 4.0 * qa * qc)) / (2.0 * qa)) ** 3


def _within_dof(col: Collector) -> float:
    """``sum_b (n_b - 1)`` over a layer's calls, ``n_b`` its samples as in :func:`_noise`'s ``w``: its degrees
    of freedom."""
    samples, _ = _samples(col)
    return float((samples - 1).sum())


def _not_random(shifts: list[LayerShift], collectors: dict[str, Collector], batches: int) -> LayerShift | None:
    """The layer whose batch means show most clearly that the data's batches are not random samples, or None.

    For batches drawn at random, ``batch_f`` is at most ``F(K - 1, sum_b (n_b - 1))`` in distribution per
    channel (see :func:`_noise`; exactly that for independent values, as ``BatchNorm1d`` on ``(N, C)``), so a
    channel median above :func:`_f_limit` has a chance of at most 2e-6 (at least half the channels above a
    level each passes with chance p: at most 2p). Only layers called once per batch on at least one row per
    sample of it count (a layer called on several inputs per forward sees inputs that differ by design; one fed
    fewer rows than samples may be fed rows that each sum up the batch, which are no samples).
    """
    if batches < 2:
        return None

    def every_sample(col: Collector) -> bool:
        data = col.data_sizes
        return data is not None and bool((col.stacked()[0] >= data).all())

    over = [s for s in shifts
            if s.batch_f is not None and len(collectors[s.layer].means) == batches
            and every_sample(collectors[s.layer])
            and s.batch_f > _f_limit(batches - 1, _within_dof(collectors[s.layer]))]
    return max(over, key=lambda s: s.batch_f, default=None)


def _noise_evidence(worst: LayerShift, worst_var: LayerShift | None, momentum: str) -> str:
    """The noise figures, each with the layer it was measured in when the two differ (the row names ``worst``);
    ``worst_var`` None: no layer's variance noise could be measured (each call saw one sample)."""
    means = f"running means are expected to wobble by {worst.mean_noise:.3g} std"
    if worst_var is None:
        return f"{means} ({momentum}); the variances' noise is not measured (one sample per call)"
    variances = f"running variances by {100 * worst_var.var_noise:.3g}%"
    if worst_var.layer == worst.layer:
        return f"{means} ({momentum}); {variances}"
    return (f"{means} in {worst.layer or '(root)'} ({momentum}); {variances} in "
            f"{worst_var.layer or '(root)'}, the noisiest layer for each")


def _noise(col: Collector, bn: nn.Module, b_train: int,
           var_r: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """RMS over channels of the running mean's std (in running std) and running variance's relative std, and
    the channel median of the batch means' F ratio.

    Between-batch mean squares (one-way ANOVA) give a batch statistic's variance per
    sample, ``s2 = sum_b n_b (m_b - m)^2 / (K - 1)`` (``n_b`` the data samples of call ``b``, see
    :func:`_samples`); at batch size ``B`` it is ``s2 / (r B)``, ``r`` the layer's share of the data's samples
    (below 1 for a routed branch that sees only some of them; ``sum_b n_b / sum_b`` the calls' data batch sizes)
    (``sum_b (n_b - 1)(v_b - v)^2 / (K - 1)`` and ``/ (r B - 1)`` for the unbiased variance).
    This assumes batches drawn at random from the data. ``F = s2 / (w + eps)`` with
    ``w = sum_b n_b v_b / sum_b (n_b - 1)`` (``v_b`` the biased variance of the batch's values): for random
    batches a sample's channel mean varies by ``t2 <= sigma2`` (its values' variance; law of total variance),
    ``E v_b = sigma2 - t2 / n_b``, so ``E w >= t2 = E s2`` and ``E F <= 1`` (``= 1`` with one value per channel
    and sample, as ``BatchNorm1d`` on ``(N, C)``); batches that differ systematically (data sorted by class)
    give far more.
    """
    if len(col.means) < 2:
        return None, None, None
    _, _, means, biased = col.stacked()
    n, aggregate = _samples(col)
    every = col.called_samples  # batches whose call gave the layer no rows count too; batches that skipped it not
    share = 1.0 if every is None else min(1.0, float(n.sum()) / every)  # a routed branch's share of the samples
    b_layer = share * b_train  # the samples a training batch of b_train gives the layer
    variances = col.batch_vars()
    k = len(n)
    s2_mean = n @ np.square(means - n @ means / n.sum()) / (k - 1)
    within = 0.0 if aggregate else float((n - 1).sum())  # no within-batch spread in a row that sums up its batch
    batch_f = None
    if within > 0:
        spread = n @ biased / within + bn.eps
        informative = spread > 0  # a constant channel with eps 0 says nothing (0 / 0)
        if informative.any():
            batch_f = float(np.median(s2_mean[informative] / spread[informative]))
    if not is_batchnorm(bn) or is_frozen(bn, "stats"):  # frozen statistics no longer change
        return None, None, batch_f
    if is_cumulative(bn):  # momentum=None, or a drop-in layer's debias=True with momentum 0
        updates = max(int(bn.num_batches_tracked or 1), 1)
        factor = 1.0 / math.sqrt(updates)
    elif bn.momentum == 0.0:  # the statistics never move
        factor = 0.0
    elif 0.0 < bn.momentum < 2.0:
        factor = ema_noise_factor(bn.momentum)
    else:  # from 2 on (or NaN, negative) the running average diverges: a momentum finding says so
        return None, None, batch_f
    with np.errstate(over="ignore"):  # statistics near float64's range: inf
        mean_noise = float(np.sqrt(np.mean(factor ** 2 * s2_mean / b_layer / var_r)))
    if within == 0:
        return mean_noise, None, None
    v_bar = (n - 1) @ variances / within
    s2_var = (n - 1) @ np.square(variances - v_bar) / (k - 1)
    var_noise = factor * np.sqrt(s2_var / max(b_layer - 1, 1)) / np.maximum(v_bar + bn.eps, 1e-300)
    return mean_noise, float(np.sqrt(np.mean(var_noise ** 2))), batch_f


def _samples(col: Collector) -> tuple[np.ndarray, bool]:
    """Each call's data samples, the unit batches are drawn in, and whether its row sums up its whole batch.

    A call's rows (``x.shape[0]``) when they are its data batch's samples or a share of them (a routed branch);
    the data batch's size when the layer saw more rows than that (rows reshaped from ``(N, T, C)``, which may be
    correlated within a sample) or one row per call (``x.mean(0)``: an aggregate of the batch, ``True``). The rows
    alone where the data batches' sizes are unknown (a collector used outside a pass)."""
    rows, _, _, _ = col.stacked()
    data = col.data_sizes
    if data is None:
        return rows, False
    if (rows == 1).all() and (data > 1).any():
        return data, True
    return np.minimum(rows, data), False


def _gap_findings(batch_out: list[torch.Tensor], eval_out: list[torch.Tensor], report: AuditReport,
                  ordered: LayerShift | None) -> list[Finding]:
    """The gap on the first batch; ``ordered``: the layer showing that the batches are not random samples."""
    if not batch_out or not eval_out or len(batch_out) != len(eval_out):
        return [Finding("info", "(model)", "train-vs-eval gap not measured", "the model's output holds no tensors",
                        "", "gap")]
    bad = sum(int((~torch.isfinite(t)).sum()) for t in eval_out)  # a complex value with a NaN part counts
    if bad:
        return [Finding("error", "(model)", "non-finite outputs in eval mode",
                        f"{bad} of {sum(t.numel() for t in eval_out)} output values are NaN/Inf on the first batch",
                        "see the non-finite / negative variance findings; recalibrate the statistics",
                        "eval_nonfinite")]
    # each output tensor against its own size (logits beside a reconstruction in pixel units), the worst
    kept = [k for k in sorted(_compared_outputs(eval_out)) if batch_out[k].shape == eval_out[k].shape]
    if not kept:
        return [Finding("info", "(model)", "train-vs-eval gap not measured",
                        f"no output tensor has the same shape with batch statistics as with running statistics "
                        f"({[tuple(t.shape) for t in batch_out]} vs {[tuple(t.shape) for t in eval_out]}: what it "
                        "keeps depends on the statistics, as boxes kept by their score)",
                        "pass forward= returning outputs of fixed shape, e.g. the scores before they are filtered",
                        "gap")]
    if bad := sum(int((~torch.isfinite(batch_out[k])).sum()) for k in kept):
        return [Finding("info", "(model)", "train-vs-eval gap not measured",
                        f"{bad} output values are NaN/Inf with batch statistics on the first batch (eval mode's are "
                        "finite), so no gap is measured", "", "gap")]
    gap = max(float((_wide(batch_out[k]) - _wide(eval_out[k])).norm() / _wide(batch_out[k]).norm().clamp_min(1e-12))
              for k in kept)
    report.train_eval_gap = gap
    agree = ""
    if (batch_out[0].ndim == 2 and batch_out[0].shape[1] > 1 and batch_out[0].is_floating_point()
            and batch_out[0].shape == eval_out[0].shape):
        same = (batch_out[0].argmax(1) == eval_out[0].argmax(1)).double().mean()
        agree = f"; argmax agrees on {100 * float(same):.3g}% of the batch"
    several = f", the largest of {len(kept)} output tensors" if len(kept) > 1 else ""
    evidence = (f"|y_train - y_eval| / |y_train| = {gap:.3g} on the first batch (batch statistics vs running "
                f"statistics{several}){agree}")
    if ordered is not None:
        return [Finding(
            "info", "(model)", "train-vs-eval output gap", evidence + "; the data's batches are not random samples "
            f"(see the noise finding at {ordered.layer or '(root)'}), so the first batch's statistics differ from the "
            "data's by more than chance and the gap overstates that of a random batch",
            "shuffle the data to measure it", "gap", {"gap": gap})]
    return [Finding(
        "warning" if gap > GAP_WARNING else "info", "(model)", "train-vs-eval output gap",
        evidence + "; the batch is taken as a random sample of the data (shuffle=True)",
        "" if gap <= GAP_WARNING else "see the ranked statistics shifts; recalibrate on this data",
        "gap", {"gap": gap})]


class _BatchStatSuspects:
    """Context manager: which BatchNorm layers that may normalize with batch statistics in eval mode the forward
    under it reaches. ``batch_stat``: layers without running statistics (PyTorch's forward then uses the batch's);
    ``own``: layers with a forward of their own (which statistics it uses is theirs to say). A layer the data
    never reaches couples nothing; a hook is put on the suspects only."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.suspects = [(n, bn) for n, bn in layers if bn.running_mean is None or not has_stock_eval_forward(bn)]
        self.names = {id(bn): n for n, bn in layers}  # every layer, to name one a traceback shows
        self.reached: set[str] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> _BatchStatSuspects:
        try:
            for name, bn in self.suspects:
                self._handles.append(bn.register_forward_pre_hook(lambda *_, name=name: self.reached.add(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def batch_stat(self) -> list[str]:
        return [n for n, bn in self.suspects if n in self.reached and bn.running_mean is None]

    @property
    def own(self) -> list[str]:
        return [n for n, bn in self.suspects if n in self.reached and bn.running_mean is not None]

    @property
    def unseen(self) -> list[str]:
        """Suspects whose hook never ran: not reached, or called where hooks do not run (``bn.forward(x)``, a
        ``torch.compile``'d module)."""
        return [n for n, _ in self.suspects if n not in self.reached]


def _coupling_findings(model, suspects: _BatchStatSuspects, batch, eval_out, forward, samples: int,
                       report: AuditReport) -> list[Finding]:
    size = batch_len(batch)
    if not eval_out:
        return [Finding("info", "(model)", "batch coupling not checked", "the model's output holds no tensors",
                        "pass forward= returning the output tensors", "batch_coupling")]
    if size is None:
        return [Finding("info", "(model)", "batch coupling not checked",
                        f"the data's batches are {type(batch).__name__} objects, whose number of samples bnkit cannot "
                        "read (it reads tensors, and tuples, lists, dicts and dataclasses of them)",
                        "pass the inputs as tensors with the batch on dimension 0, and forward= to feed them",
                        "batch_coupling")]
    if size < 2 or samples < 1:
        return []
    if not all(bool(torch.isfinite(t).all()) for t in eval_out):
        return []  # reported as non-finite eval outputs
    batch_stat_bn = suspects.batch_stat
    cause, fix = _coupling_cause(suspects)
    idx = sorted(set(np.linspace(0, size - 1, min(samples, size)).round().astype(int).tolist()))
    kept = _compared_outputs(eval_out)
    scale = {k: float(_wide(eval_out[k]).abs().max()) if eval_out[k].numel() else 0.0 for k in kept}
    worst: dict[int, float] = {}  # by output tensor: each is judged against its own largest value
    single: list[torch.Tensor] = []
    for i in idx:
        try:
            one = map_tensors(batch, lambda t: t[i:i + 1] if batched(t, size) else t)
            single = flatten_tensors(forward(model, one))
        except Exception as exc:
            return [_batch_one_failure(exc, suspects, cause, fix)]
        if len(single) != len(eval_out):
            continue  # the output's structure changes with the batch size: nothing lines up
        for k, (s, ref) in enumerate(zip(single, eval_out)):
            pair = _same_sample(s, ref, size, i) if k in kept and ref.numel() else None
            if pair is None:
                continue
            if not bool(torch.isfinite(pair[0]).all()):  # finite in the batch (checked above), not alone
                return [Finding("error", "(model)", "the model gives NaN/Inf at batch size 1 in eval mode",
                                f"sample {i} alone gives NaN/Inf outputs, in a batch of {size} finite ones; {cause}",
                                fix, "batch_one_fails", {"batch_stat_layers": batch_stat_bn})]
            worst[k] = max(worst.get(k, 0.0), float((_wide(pair[0]) - _wide(pair[1])).abs().max()))
    compared = set(worst)
    shapes = (f"batch size 1 gave {[tuple(t.shape) for t in single]}, batch size {size} gave "
              f"{[tuple(t.shape) for t in eval_out]}")
    if not compared:
        return [Finding("info", "(model)", "batch coupling not checked",
                        f"no output tensor of the batch-1 and batch-{size} runs lines up sample by sample "
                        f"({shapes}; the batch must be the one dimension where they differ, 1 vs {size}, or one "
                        f"of size {size} squeezed away at batch size 1), so nothing was compared",
                        "pass forward= returning per-sample outputs with the batch on dimension 0, e.g. "
                        "forward=lambda model, x: model(x).transpose(0, 1)", "batch_coupling",
                        {"batch_one_shapes": [list(t.shape) for t in single],
                         "batch_shapes": [list(t.shape) for t in eval_out]})]
    rel = max(worst[k] / max(scale[k], 1e-12) for k in compared)
    report.batch_coupling = rel
    partly = "" if len(compared) == len(eval_out) else (
        f"; {len(compared)} of {len(eval_out)} output tensors compared, the others have no batch dimension to "
        f"line up ({shapes})")
    if rel <= COUPLING_RTOL:
        return [Finding("info", "(model)", "per-sample outputs do not depend on the batch",
                        f"eval mode, batch size 1 vs {size} on {len(idx)} samples: max difference {rel:.2g} of max "
                        f"|output|{partly}", "", "batch_coupling", {"relative_diff": rel})]
    try:  # the same batch once more: random outputs are not coupling
        again = flatten_tensors(forward(model, batch))
    except Exception as exc:
        who = "the model" if forward is default_forward else "the model or forward="
        raise ValueError(f"{who} failed in eval mode on the first data batch, run again to tell coupling from "
                         f"random outputs: {type(exc).__name__}: {exc}") from exc
    repeat = max((float((_wide(again[k]) - _wide(eval_out[k])).abs().max()) / max(scale[k], 1e-12)
                  for k in kept if k < len(again) and again[k].shape == eval_out[k].shape and again[k].numel()),
                 default=0.0)
    if len(again) != len(eval_out) or repeat > COUPLING_RTOL:
        report.batch_coupling = None
        return [Finding("warning", "(model)", "outputs are random in eval mode",
                        f"the same batch run twice in eval mode gives outputs {repeat:.3g} of max |output| apart "
                        "(sampling, or Dropout left on at inference), so whether samples depend on the rest of their "
                        "batch was not checked", "if inference should be deterministic, find the random operation "
                        "(a layer that samples, torch.randn in forward, F.dropout(training=True))", "random_outputs",
                        {"repeat_diff": repeat})]
    return [Finding("error", "(model)", "per-sample outputs depend on the rest of the batch",
                    f"eval mode, batch size 1 vs {size}: outputs differ by {rel:.3g} of max |output|; {cause}"
                    + partly + " (samples are cut along dimension 0 of the inputs: for sequence-first (T, N, C) "
                    "data, pass it batch-first with forward=lambda m, x: m(x.transpose(0, 1)))",
                    fix, "batch_coupling", {"relative_diff": rel, "batch_stat_layers": batch_stat_bn})]


#: The fix where BatchNorm layers normalize with batch statistics at inference.
_GIVE_RUNNING_STATS = "give these layers running statistics (track_running_stats=True, then bnkit recalibrate)"
#: What PyTorch's batch_norm says when it refuses a batch of one value per channel (torch/nn/functional.py,
#: ``_verify_batch_size``): a BatchNorm normalizing with batch statistics, whichever layer it is.
_BATCH_OF_ONE_REFUSED = "Expected more than 1 value per channel"
#: What bnkit's drop-in layers say instead (:func:`bnkit.torch.layers.batch_of_one_message`), naming the layer.
_BNKIT_REFUSED = "only 1 value per channel, so the batch variance is undefined"


def _refusing_layer(exc: BaseException, names: dict[int, str]) -> tuple[str | None, nn.Module | None, bool]:
    """From ``exc``'s traceback, who called ``torch.nn.functional.batch_norm`` last: one of ``names``' layers (a
    method of it, its ``forward`` or an alias; its name and itself), or other code (``functional``: a call in a
    forward or a hook), or nothing seen (no such frame: a compiled module, or another error)."""
    frames = _frames(exc)
    calls = [i for i, f in enumerate(frames) if _is_functional_batch_norm(f.f_code)]
    if not calls:
        return None, None, False
    i = calls[-1] - 1
    # a __torch_function__ override (a TorchFunctionMode such as torch.device(...) as a context, a tensor subclass)
    # calls batch_norm again on the first call's behalf: its caller is the caller of the first
    while i >= 0 and (_is_functional_batch_norm(frames[i].f_code) or frames[i].f_code.co_name == "__torch_function__"
                      or _path(frames[i]).endswith(("torch/overrides.py", "torch/utils/_device.py"))):
        i -= 1
    while i >= 0 and "self" not in frames[i].f_locals:  # a helper function a method calls, or a hook's lambda
        i -= 1
    # the nearest method: a layer's own (its forward, an alias, one calling a helper), or Module._call_impl running
    # a hook, which is not the layer's batch_norm
    caller = frames[i].f_locals.get("self") if i >= 0 and not _path(frames[i]).endswith(_MODULE_PY) else None
    if id(caller) in names:
        return names[id(caller)], caller, False
    return None, None, True


_MODULE_PY = "torch/nn/modules/module.py"


def _frames(exc: BaseException) -> list[Any]:
    """The frames of ``exc``'s traceback, outermost first."""
    return [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]


def _path(frame: Any) -> str:
    return frame.f_code.co_filename.replace("\\", "/")


def _refusal(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain (itself, then its ``__cause__`` or ``__context__``) that is PyTorch's or
    bnkit's refusal of one value per channel, or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if _BATCH_OF_ONE_REFUSED in str(exc) or _BNKIT_REFUSED in str(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    return None


def _raised_by_own_forward(exc: BaseException, suspects: _BatchStatSuspects) -> bool:
    """Whether ``exc`` was raised in the code of a suspect layer with a forward of its own (the traceback's innermost
    frame is its method): its own refusal of a single sample, in its own words. A stock layer refuses only in
    PyTorch's (its other errors, of shapes, are the input's)."""
    frames = _frames(exc)
    owner = frames[-1].f_locals.get("self") if frames and not _path(frames[-1]).endswith(_MODULE_PY) else None
    return any(bn is owner and not has_stock_eval_forward(bn) for _, bn in suspects.suspects)


def _is_functional_batch_norm(code: Any) -> bool:
    return code.co_name == "batch_norm" and code.co_filename.endswith("functional.py")


def _batch_one_failure(exc: Exception, suspects: _BatchStatSuspects, cause: str, fix: str) -> Finding:
    """The error finding for a model that raises on a single sample in eval mode, with the likeliest cause: for
    PyTorch's refusal of one value per channel, the layer the traceback shows refusing, where it shows one."""
    refusal = _refusal(exc)  # PyTorch's or bnkit's refusal, also one the model caught and raised anew
    name, layer, functional = _refusing_layer(refusal or exc, suspects.names)
    refused = refusal is not None and _BATCH_OF_ONE_REFUSED in str(refusal)
    if refusal is None and not _raised_by_own_forward(exc, suspects):  # no BatchNorm refused it: another failure
        cause = ("no BatchNorm refused the single sample (PyTorch's and bnkit's refusals say so), so something else "
                 "in the model needs more than one")
        fix = ("find the operation that needs more than one sample (x.squeeze() dropping the batch dimension of a "
               "single sample, a reduction over dimension 0) and make it per-sample")
    elif refused and layer is not None and layer.running_mean is None:
        cause = (f"BatchNorm layer {name} has no running statistics, so it normalizes with the batch's in eval mode "
                 "and refused the batch of one")
        fix = _GIVE_RUNNING_STATS
    elif refused and layer is not None:
        cause = (f"BatchNorm layer {name} has running statistics but normalized with the batch's in eval mode (its "
                 "forward, or the module calling it, runs it in training mode) and refused the batch of one")
        fix = ("keep that layer in eval mode at inference: find what puts it in training mode (a train() call, or "
               "training=True handed to batch_norm) in the forward")
    elif refused and functional:
        cause = ("PyTorch's batch_norm refused the batch of one: a call normalizing with batch statistics in eval "
                 "mode that is no BatchNorm layer bnkit sees (torch.nn.functional.batch_norm with training=True in a "
                 "forward)")
        fix = ("normalize with running statistics there in eval mode (F.batch_norm with running_mean/running_var "
               "and training=False), or make that call per-sample")
    elif refused and not suspects.batch_stat:  # no frame to read (a compiled module): the likeliest layers
        cause = ("PyTorch's BatchNorm refused the batch of one: a BatchNorm layer normalizes with batch statistics "
                 "in eval mode" + (f" (of {short_names(suspects.unseen)}, whose calls bnkit did not see)"
                                   if suspects.unseen else ""))
        fix = _GIVE_RUNNING_STATS
    return Finding("error", "(model)", "the model fails at batch size 1 in eval mode",
                   f"{type(exc).__name__}: {exc}; {cause}", fix, "batch_one_fails",
                   {"batch_stat_layers": suspects.batch_stat})


def _coupling_cause(suspects: _BatchStatSuspects) -> tuple[str, str]:
    """Why per-sample outputs can depend on the batch, and the fix: the BatchNorm layers the data reaches without
    running statistics; else those reached with a forward of their own; else those whose calls were not seen;
    else something other than BatchNorm."""
    batch_stat_bn, own, unseen = suspects.batch_stat, suspects.own, suspects.unseen
    if batch_stat_bn:
        return (f"BatchNorm layers without running statistics ({short_names(batch_stat_bn)}) normalize with the "
                "batch's", _GIVE_RUNNING_STATS)
    other = "(e.g. x - x.mean(0), batch-level normalization or attention across the batch)"
    if unseen and not own:
        return (f"BatchNorm layers that may normalize with batch statistics in eval mode ({short_names(unseen)}: "
                "no running statistics, or a forward of their own) were not seen called, which means not reached "
                "unless the model calls them through .forward() or a compiled module, where hooks do not run; if "
                f"not, something other than BatchNorm couples the batch {other}",
                "if these layers run in this forward, give them running statistics (track_running_stats=True, then "
                "bnkit recalibrate) or check what their forward normalizes with; otherwise find the operation that "
                "reduces over the batch dimension and make it per-sample")
    if own:
        return (f"BatchNorm layers with a forward of their own ({short_names(own)}) may normalize with the batch's "
                f"statistics in eval mode (which statistics they use is their forward's to say), or something other "
                f"than BatchNorm couples the batch {other}",
                "check whether these layers' forward normalizes with batch statistics in eval mode (F.batch_norm "
                "with training=True, or its own arithmetic); if not, find the operation that reduces over the batch "
                "dimension and make it per-sample")
    return ("every BatchNorm layer the data reaches uses running statistics in eval mode, so something OTHER than "
            f"BatchNorm couples the batch {other}",
            "find the operation that reduces over the batch dimension and make it per-sample")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64, or complex128 where complex (``double()`` would drop the imaginary part)."""
    return t.to(torch.complex128) if t.is_complex() else t.double()


def _compared_outputs(outputs: list[torch.Tensor]) -> set[int]:
    """The output tensors the gap and coupling checks compare: the floating ones (integer ones, labels an argmax
    made of them, flip on rounding alone), or all where there is none."""
    floating = {k for k, t in enumerate(outputs) if t.is_floating_point() or t.is_complex()}
    return floating or set(range(len(outputs)))


def _same_sample(single: torch.Tensor, ref: torch.Tensor, size: int,
                 i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sample ``i`` of the batch-``size`` output ``ref`` and the batch-1 output ``single``, paired by their shapes.

    The batch is the one dimension where the shapes differ, ``size`` against 1 (dimension 0 for batch-first
    outputs, 1 for sequence-first ``(T, N, C)`` ones), or a dimension of size ``size`` that batch size 1
    squeezed away (``.squeeze()``); None when the shapes do not name one.
    """
    a, b = tuple(single.shape), tuple(ref.shape)
    if len(a) == len(b):
        diff = [d for d in range(len(b)) if a[d] != b[d]]
        if len(diff) == 1 and a[diff[0]] == 1 and b[diff[0]] == size:
            return single.select(diff[0], 0), ref.select(diff[0], i)
    elif len(a) == len(b) - 1:
        dims = [d for d in range(len(b)) if b[d] == size and b[:d] + b[d + 1:] == a]
        if len(dims) == 1:
            return single, ref.select(dims[0], i)
    return None
