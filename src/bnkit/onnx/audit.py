"""Audit the BatchNormalization nodes of an ONNX model without running it.

Flags, as :class:`bnkit.findings.Finding` rows (layer = node name):

* ``training_mode=1`` (opset >= 14), or running-statistic outputs requested (opset 9-13):
  onnxruntime then normalises each batch with its own statistics, so outputs depend on
  the batch and not on the stored running statistics (error);
* extra running-statistic outputs on an inference node (from opset 14 invalid, onnxruntime refuses the model:
  error; warning below);
* optional outputs written as blank names in a pattern onnxruntime 1.32 cannot run: it refuses the model or
  crashes (segmentation fault) running the node, unless its graph optimizer fuses the node away first (error);
* statistics or parameters computed at run time, so they cannot be checked (warning; the node's stored
  arrays are checked as below);
* statistics or parameters that are graph inputs with stored values (initializers also listed
  as inputs, as ``keep_initializers_as_inputs=True`` and opset < 9 exports write them): a caller
  may override them (warning); the stored values, which run otherwise, are checked as below;
* per-channel array problems, checked by :func:`bnkit.audit_state.check_bn_stats`:
  non-finite values, never-updated statistics (every mean 0 and variance 1),
  negative variances, variances below ``epsilon``, near-zero scales;
* a ``Dropout`` whose ``training_mode`` input is a constant true (opset >= 12, as a
  training-mode export writes it): its outputs are random on every run (warning);
* a model that fails ``onnx.checker`` (error), and a node that cannot be read (an attribute of
  another type than its op requires, a required one missing: error, in place of the node rows).

ONNX's ``momentum`` is the weight on the OLD running value; it is passed on in PyTorch's
convention (``1 - momentum``). A clean inference export yields no warning or error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..audit_state import BNStats, check_bn_stats
from ..findings import Finding, jsonable, worst_severity
from .graph import (BNNode, FunctionKey, MalformedNodeError, blank_outputs_fail, bn_nodes, check_model, load_model,
                    local_functions, opset_version, training_dropouts, unswitchable_training)

__all__ = ["OnnxAuditReport", "audit"]


@dataclass
class OnnxAuditReport:
    """Findings of :func:`audit`; ``ok`` is True when none is an error."""

    findings: list[Finding] = field(default_factory=list)
    #: One row per BatchNormalization node: name, channels, epsilon, momentum (ONNX side), training.
    nodes: list[dict] = field(default_factory=list)
    opset: int | None = None

    @property
    def ok(self) -> bool:
        return worst_severity(self.findings) != "error"

    @property
    def worst(self) -> str | None:
        return worst_severity(self.findings)

    def to_dict(self) -> dict:
        return jsonable({"ok": self.ok, "opset": self.opset, "nodes": self.nodes,
                         "findings": [f.to_dict() for f in self.findings]})


def _node_findings(bn: BNNode, switchable: bool) -> list[Finding]:
    """``switchable``: the file holds no training-mode node ``bnkit fold --to-inference`` refuses."""
    findings = []
    rewritable = bn.unrewritable is None  # what bnkit fold switches or tidies
    switch_advice = ("`bnkit fold --to-inference` switches an existing file" if rewritable and switchable else
                     f"bnkit fold cannot switch it ({bn.unrewritable})" if not rewritable else
                     "bnkit fold --to-inference refuses this file (it holds training nodes inside If/Loop bodies "
                     "or local functions, or whose running statistics other nodes or the graph's outputs read)")
    if bn.training:
        if bn.opset >= 14:
            how = "training_mode=1"
        elif bn.extra_outputs:
            how = f"running-statistic outputs requested (opset {bn.opset})"
        else:  # opset < 7: is_test, whose default 0 is training mode
            how = f"is_test=0 (opset {bn.opset}, where 0 is the default)"
        evidence = (f"{how}: onnxruntime normalises with each batch's own mean and variance, so an output depends "
                    "on the other samples in its batch and a batch of one is normalised to beta")
        if bn.statistics_outputs_absent:
            evidence = (f"{how} with outputs {list(bn.node.output)} only: onnxruntime refuses to load the model "
                        "(training_mode=1 needs the running mean and variance outputs too) and onnx.checker's full "
                        "check fails; run, it would normalise with each batch's own statistics")
        elif bn.statistics_outputs_missing:
            evidence = (f"{how} with outputs {list(bn.node.output)}: onnxruntime loads the model but crashes running "
                        "this node, whose running mean or variance output is blank (\"\"); run, it would normalise "
                        "with each batch's own statistics")
        findings.append(Finding(
            "error", bn.name, "BatchNormalization in training mode", evidence,
            "export with the model in eval mode (model.eval(); torch.onnx.export(..., training=TrainingMode.EVAL)) "
            "or bnkit.torch.export_onnx; " + switch_advice,
            "training_mode", {"opset": bn.opset, "extra_outputs": bn.extra_outputs}))
    elif bn.extra_outputs:
        refused = ("; onnxruntime refuses to load the model and onnx.checker's full check fails" if bn.opset >= 14
                   else "")
        findings.append(Finding(
            "error" if refused else "warning", bn.name, "extra running-statistic outputs on an inference node",
            f"outputs {bn.extra_outputs} beside Y; the ONNX spec allows them only with training_mode=1{refused}",
            "re-export in eval mode" + (", or `bnkit fold` (removes them where unused)" if rewritable
                                        else f" (bnkit fold does not rewrite this node: {bn.unrewritable})"),
            "extra_outputs", {"extra_outputs": bn.extra_outputs}))
    if blank_outputs_fail(bn.node, bn.opset):
        findings.append(Finding(  # an error, as named extra outputs that onnxruntime refuses are
            "error", bn.name, "blank running-statistic outputs",
            f"outputs {list(bn.node.output)}: optional outputs named \"\" (absent) in this pattern stop onnxruntime "
            "1.32 (it refuses the model, or crashes with a segmentation fault running it)",
            "`bnkit fold` drops them from an inference node" + (
                " (add --to-inference for a training-mode one)" if rewritable and switchable
                else "; a training-mode one here needs a re-export in eval mode"),
            "blank_outputs", {"outputs": list(bn.node.output)}))
    for note in bn.notes:
        findings.append(Finding("warning", bn.name, "unusual BatchNormalization attribute", note,
                                "re-export with opset >= 9", "spatial"))
    fix = "export with parameters as initializers (export_params=True, keep_initializers_as_inputs=False)"
    missing = [k for k in ("scale", "bias", "mean", "var") if getattr(bn, k) is None]
    if missing:
        findings.append(Finding(
            "warning", bn.name, "statistics are not constants",
            f"{', '.join(missing)} computed at run time or fed as graph inputs with no stored value, "
            "so they cannot be checked or folded (the stored ones are checked)", fix, "not_constant",
            {"missing": missing}))
    if bn.overridable:
        findings.append(Finding(
            "warning", bn.name, "statistics can be overridden at run time",
            f"{', '.join(bn.overridable)} are graph inputs with stored values (initializers also listed as "
            "inputs): the stored values, checked here, run unless a caller feeds others; `bnkit fold` leaves them",
            fix + ", opset >= 9", "overridable", {"overridable": bn.overridable}))
    arrays = (bn.mean, bn.var, bn.scale, bn.bias)
    stored = [a for a in arrays if a is not None]
    if not stored:
        return findings
    positions = 1
    if any(n.startswith("spatial=0") for n in bn.notes) and len({a.shape for a in stored}) == 1 \
            and stored[0].ndim > 1 and stored[0].size:  # one statistic per (channel, position): (C, H, W) each
        positions = stored[0].size // stored[0].shape[0]
        arrays = tuple(None if a is None else a.reshape(-1) for a in arrays)
        stored = [a.reshape(-1) for a in stored]
    mean, var, scale, bias = arrays
    # a statistic computed at run time stands in as its initial value (mean 0, var 1), which no check flags alone
    stats = BNStats(name=bn.name, running_mean=np.zeros_like(stored[0]) if mean is None else mean,
                    running_var=np.ones_like(stored[0]) if var is None else var, weight=scale, bias=bias,
                    eps=bn.epsilon, momentum=1.0 - bn.momentum, positions=positions)
    unknown = {"never_updated"} if mean is None or var is None else set()
    if var is None:
        unknown |= {"tiny_var", "zero_var", "nonpositive_var_eps"}
    return findings + [f for f in check_bn_stats(stats) if f.code not in unknown]


def _dropout_findings(graph: onnx.GraphProto, opset: int,
                      functions: dict[FunctionKey, onnx.FunctionProto]) -> list[Finding]:
    """A warning per Dropout (If/Loop/Scan bodies and local functions too) whose ``training_mode`` input is a
    constant true, or a graph input with a stored default true (ONNX Dropout-12+)."""
    top = list(graph.node)  # held while ids are compared: a protobuf wrapper keeps its id only while referenced
    ids = {id(node) for node in top}
    return [Finding("warning", name, "Dropout in training mode",
                    (f"its training_mode input is graph input {node.input[2]!r} with a stored default true "
                     "(an initializer also listed as an input): every run that does not feed false" if overridable
                     else "its training_mode input is true: every run")
                    + " zeroes a random part of the values and rescales the rest, so outputs are random",
                    "export with the model in eval mode" + (
                        ", or `bnkit fold --to-inference` (switches it to inference)" if id(node) in ids
                        else " (bnkit fold cannot switch it inside an If/Loop body or a local function)"),
                    "dropout_training", {"overridable": ["training_mode"]} if overridable else {})
            for node, known, overridable, name in training_dropouts(graph, opset, nested=True, functions=functions)
            if known]


def _audit_nodes(proto: onnx.ModelProto, opset: int, report: OnnxAuditReport) -> list[BNNode]:
    """Add each BatchNormalization node's row and findings, and the Dropout findings, to ``report``; the nodes.
    Raises :class:`~bnkit.onnx.graph.MalformedNodeError` for a node it cannot read."""
    functions = local_functions(proto)
    nodes = bn_nodes(proto.graph, opset, functions=functions)
    switchable = not unswitchable_training(proto.graph, opset, nodes, functions=functions)
    for bn in nodes:
        channels = next((int(a.shape[0]) for a in (bn.mean, bn.var, bn.scale, bn.bias)
                         if a is not None and a.ndim), None)  # spatial=0's (C, H, W) statistics too
        report.nodes.append({"name": bn.name, "channels": channels, "epsilon": bn.epsilon,
                             "momentum": bn.momentum, "training": bn.training})
        report.findings.extend(_node_findings(bn, switchable))
    report.findings.extend(_dropout_findings(proto.graph, opset, functions))
    return nodes


def audit(model: "str | os.PathLike | onnx.ModelProto") -> OnnxAuditReport:
    """Check every BatchNormalization node of an ONNX model (path or ModelProto; the proto is not modified).

    A node it cannot read (an attribute of the wrong type, a required one missing: the model fails
    ``onnx.checker``) gives a ``malformed_node`` error finding instead of the node rows."""
    proto = load_model(model)
    opset = opset_version(proto)
    report = OnnxAuditReport(opset=opset)
    try:
        check_model(proto, model)
    except onnx.checker.ValidationError as exc:
        report.findings.append(Finding(
            "error", "(model)", "the model fails onnx.checker", str(exc).splitlines()[0],
            "re-export the model; runtimes may reject or misread it", "invalid_model"))
    try:
        nodes = _audit_nodes(proto, opset, report)
    except MalformedNodeError as exc:
        report.findings.append(Finding(
            "error", "(model)", "a node cannot be read", str(exc),
            "re-export the model; runtimes reject or misread such a node", "malformed_node"))
        report.nodes, nodes = [], None
    if nodes == []:
        report.findings.append(Finding(
            "info", "(model)", "no BatchNormalization nodes",
            "nothing to audit: folded already, or the model has no BatchNorm (torch.onnx.export's default exporter, "
            "dynamo=True, folds eval-mode BatchNorm into the layer before it)",
            "folded statistics cannot be checked in the graph: audit the PyTorch model or checkpoint before export "
            "(bnkit audit FILE.pt --model ...)", code="no_bn"))
    order = {s: i for i, s in enumerate(("error", "warning", "info"))}
    report.findings.sort(key=lambda f: order[f.severity])
    return report
