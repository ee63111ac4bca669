"""The one small interface every backend implements.

Modelled on Polygraphy's runners: a runner is created cheaply, `load()` does the expensive
work, `infer()` maps numpy inputs to numpy outputs, `close()` frees everything. Benchmarks use
`prepare(batch)` instead of `infer()`: it binds a fixed input once and returns a `run()` that
does nothing but execute, so the harness adds no copies or allocations to what it times.
"""

import collections

import numpy as np

from ..errors import RuntimeToolError

TensorSpec = collections.namedtuple("TensorSpec", ["name", "shape", "dtype"])
TensorSpec.__doc__ = "An input or output: shape is a tuple with -1 for dynamic axes; dtype a numpy dtype."



class Outputs(list):
    """A runner's outputs: a list in the graph's output order that also answers by name.

    `infer(x)[0]` stays the first output; `out["logits"]`, `out.names` and `out.as_dict()` name
    them, so a device task or the comparator reads the outputs it needs whatever their order.
    """

    def __init__(self, names, arrays):
        names = [str(n) for n in names]
        arrays = list(arrays)
        if len(names) != len(arrays):
            raise RuntimeToolError("{} output names for {} outputs".format(len(names), len(arrays)))
        list.__init__(self, arrays)
        self.names = names

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return list.__getitem__(self, self.names.index(key))
            except ValueError:
                raise KeyError("no output named {!r} (outputs: {})".format(key, ", ".join(self.names))) from None
        return list.__getitem__(self, key)

    def __contains__(self, key):
        if isinstance(key, str):
            return key in self.names
        return list.__contains__(self, key)

    def as_dict(self):
        return collections.OrderedDict(zip(self.names, self))

    def __repr__(self):
        return "Outputs({})".format(", ".join("{}={}".format(n, getattr(a, "shape", "?"))
                                              for n, a in zip(self.names, self)))


class Prepared:
    """A bound inference for one batch size; `run()` returns None or (h2d, compute, d2h) in ms."""

    def __init__(self, run, batch, close=None):
        self.run = run
        self.batch = batch
        self._close = close

    def close(self):
        if self._close is not None:
            self._close()
            self._close = None


class Runner:
    backend = "base"

    def __init__(self):
        self.metadata = {}
        self.info = {}
        self.loaded = False
        self._inputs = []
        self._outputs = []

    def load(self):
        raise NotImplementedError

    def inputs(self):
        """[TensorSpec] of the model's inputs; runners set `_inputs` when they load."""
        return list(self._inputs)

    def outputs(self):
        return list(self._outputs)

    def batch_range(self):
        """(smallest, largest) batch this model accepts; largest None means unbounded."""
        dim = self.inputs()[0].shape[0]
        return (dim, dim) if dim > 0 else (1, None)

    def infer(self, feed):
        """feed: one array (single-input models) or {name: array}; returns Outputs (every output, named)."""
        raise NotImplementedError

    def prepare(self, batch, cuda_graph=False, spin_wait=False):
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        if not self.loaded:
            self.load()
        return self

    def __exit__(self, *exc):
        self.close()


def as_feed(runner, feed):
    """Normalize an array or dict into {input name: contiguous array of the input's dtype}."""
    specs = runner.inputs()
    if not isinstance(feed, dict):
        if len(specs) != 1:
            raise RuntimeToolError("this model has {} inputs ({}): pass a dict".format(
                len(specs), ", ".join(s.name for s in specs)))
        feed = {specs[0].name: feed}
    out = {}
    for spec in specs:
        if spec.name not in feed:
            raise RuntimeToolError(f"missing input {spec.name!r}")
        out[spec.name] = np.ascontiguousarray(feed[spec.name], dtype=spec.dtype)
    return out


def check_batch(runner, batch):
    low, high = runner.batch_range()
    if batch < low or (high is not None and batch > high):
        raise RuntimeToolError("batch {} is outside what this model accepts ({}..{}){}".format(
            batch, low, high if high is not None else "any",
            ": it was exported/built with a fixed batch" if low == high else ": rebuild the engine with a "
            "larger --batch max"))


def random_inputs(specs, batch, seed=0):
    """Deterministic random inputs of batch `batch`; non-batch dims must be static."""
    rng = np.random.RandomState(seed)
    feed = {}
    for spec in specs:
        rest = tuple(spec.shape[1:])
        if any(d is None or d < 0 for d in rest):
            raise RuntimeToolError(f"input {spec.name!r} has dynamic non-batch dimensions {spec.shape}: "
                                   "cannot make benchmark data")
        shape = (batch,) + rest
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[spec.name] = rng.randint(0, 2, size=shape).astype(dtype)
        else:
            feed[spec.name] = rng.randint(0, 8, size=shape).astype(dtype)
    return feed
