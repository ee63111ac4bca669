"""The pruning methods and what each needs, stated once: `prune_run` validates against this
table and the CLI builds `--method`'s choices and its help from it. Plain Python, no torch, so
`rsedge --help` stays instant.

A new criterion is a `Criterion` in `compress.importance` (its scores) plus one `MethodSpec` here
(what it needs).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str  # the line of `rsedge prune --help`
    data: bool = False  # its scores are measured on training images: needs --data
    threshold: bool = False  # an absolute score (|gamma|): --threshold and --target-lfa allowed
    global_only: bool = False  # one ranking over the whole network: a --ratio is applied globally
    sparse: str | None = None  # the `rsedge sparse-train --method` whose BatchNorm scales it reads
    sparse_exact: bool = False  # True: only that sparse training, whatever the amount (the scores are
    #   its gammas); False: any sparse training, and only a threshold needs it (a ratio ranks any gammas)
    default_target_lfa: float | None = None  # the amount when none is given (instead of --ratio 0.5)

    def help_line(self) -> str:
        needs = []
        if self.data:
            needs.append("needs --data")
        if self.threshold and not self.global_only:
            needs.append("--threshold allowed")
        text = f"  {self.name:<8}  {self.summary}{''.join('; ' + n for n in needs)}"
        if self.global_only and self.threshold:
            lfa = f" (default {self.default_target_lfa:g}, needs --data)" if self.default_target_lfa else ""
            text += f";\n{'':12}--threshold, --ratio, or --target-lfa{lfa}"
        return text


METHOD_SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("random", "uniform random scores, the control (seeded)"),
    MethodSpec("l1", "L1 norm of the output filter (Li et al. 2017)"),
    MethodSpec("bn-scale", "|BN gamma| (network slimming, Liu et al. 2017)", threshold=True, sparse="slimming"),
    MethodSpec("fpgm", "sum of L2 distances to the layer's other filters (FPGM, He et al. 2019)"),
    MethodSpec("taylor", "|mean over the filter of dL/dw * w| on training batches (seed 002)", data=True),
    MethodSpec("cap", "RemoteTrimmer channel attention: SE-probe attention s_bar * |gamma| (seed 000)", data=True),
    MethodSpec("group", "Torch-Pruning's group L2 magnitude (DepGraph, Fang et al. 2023)"),
    MethodSpec("l1rr", "|gamma| after `rsedge sparse-train --method l1rr`, one global threshold (seed 001)",
               threshold=True, global_only=True, sparse="l1rr", sparse_exact=True, default_target_lfa=0.01),
)}
METHODS = tuple(METHOD_SPECS)
THRESHOLD_METHODS = tuple(n for n, s in METHOD_SPECS.items() if s.threshold)


def method_spec(name: str) -> MethodSpec:
    if name not in METHOD_SPECS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, not {name!r}")
    return METHOD_SPECS[name]


def methods_help() -> str:
    return "methods (the score of a channel; the lowest go):\n" + "\n".join(
        s.help_line() for s in METHOD_SPECS.values())
