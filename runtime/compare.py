"""The one comparator: two runs' outputs, output by output, plus the task's agreement.

Modelled on Polygraphy's comparator: runners return every output by name, and this compares
them with a tolerance per output (|candidate - reference| <= atol + rtol * |reference|
everywhere) and the task's own agreement measure (classification: the fraction of samples with
the same top-1 class). The host's export parity, the INT8 guard's FP32 reference and
rsedge-bench's check of each bundle variant against its FP32 variant all use it.
"""

import collections

import numpy as np

from .errors import RuntimeToolError

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 0.0


def _as_dict(outputs):
    if hasattr(outputs, "as_dict"):
        return outputs.as_dict()
    if isinstance(outputs, dict):
        return collections.OrderedDict(outputs)
    raise RuntimeToolError("outputs to compare must be a dict of name -> array or a runner's Outputs")


def pair_outputs(reference, candidate):
    """[(name, reference array, candidate array)]: by name, or by position when the two runs name the
    same number of outputs differently (a host module and the graph exported from it)."""
    ref, cand = _as_dict(reference), _as_dict(candidate)
    if set(ref) <= set(cand):
        return [(name, ref[name], cand[name]) for name in ref]
    if len(ref) == len(cand):
        return [(name, ref[name], c) for name, c in zip(ref, cand.values())]
    raise RuntimeToolError("cannot compare outputs {} with {}".format(", ".join(ref), ", ".join(cand)))


def _tolerance(name, atol, rtol, per_output):
    """(atol, rtol) for one output, or None when it is not bounded (per_output[name] is None)."""
    if per_output and name in per_output:
        spec = per_output[name]
        if spec is None:
            return None
        if isinstance(spec, dict):
            return float(spec.get("atol", atol)), float(spec.get("rtol", rtol))
        return float(spec), rtol
    return atol, rtol


def diff_stats(reference, candidate, tolerance):
    """max / mean absolute difference and whether every element is within tolerance (None: unbounded)."""
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    if r.shape != c.shape:
        raise RuntimeToolError("output shapes differ: {} vs {}".format(r.shape, c.shape))
    if not r.size:
        return {"max_abs_diff": 0.0, "mean_abs_diff": 0.0, "within_tolerance": True if tolerance else None}
    diff = np.abs(c - r)
    within = None
    if tolerance is not None:
        atol, rtol = tolerance
        within = bool(np.all(diff <= atol + rtol * np.abs(r)))
    return {"max_abs_diff": float(np.max(diff)), "mean_abs_diff": float(np.mean(diff)), "within_tolerance": within}


def compare(reference, candidate, task=None, metadata=None, atol=None, rtol=None, per_output=None,
            min_agreement=1.0):
    """Compare two runs' outputs ({name: array (N, ...)} or Outputs).

    atol / rtol: the elementwise tolerance of every output (defaults 1e-4 and 0: the export's FP32
    parity budget); per_output: {name: atol, or {"atol", "rtol"}, or None (not bounded)}; task: a
    DeviceTask whose agreement is measured (None: outputs only). passed: every bounded output is
    within tolerance and the agreement, if measured, is at least min_agreement.
    """
    atol = DEFAULT_ATOL if atol is None else float(atol)
    rtol = DEFAULT_RTOL if rtol is None else float(rtol)
    pairs = pair_outputs(reference, candidate)
    result = collections.OrderedDict()
    for name, ref, cand in pairs:
        result[name] = diff_stats(ref, cand, _tolerance(name, atol, rtol, per_output))
    agreement = None
    if task is not None:
        agreement = task.agreement(collections.OrderedDict((n, r) for n, r, _ in pairs),
                                   collections.OrderedDict((n, c) for n, _, c in pairs), metadata or {})
    passed = all(o["within_tolerance"] is not False for o in result.values())
    if agreement is not None and min_agreement is not None:
        passed = passed and agreement >= min_agreement
    return {"outputs": result, "agreement": agreement, "passed": bool(passed)}


def max_abs_diff(comparison):
    """The largest difference over every output of a compare() result."""
    values = [o["max_abs_diff"] for o in comparison["outputs"].values()]
    return max(values) if values else 0.0
