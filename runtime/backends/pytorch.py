"""PyTorch backend (host only): the reference the exported models are compared against.

It takes an already-built `torch.nn.Module` from host code (the host rebuilds architectures
from its own pickle-free model files), so nothing here loads or deserializes models: the host's
`rsedge bench` hands rsedge-bench a loader that builds a TorchRunner from a .safetensors file.
torch is imported only when a runner is loaded, never by importing this module.
"""

import numpy as np

from ..errors import BackendUnavailable
from .base import Outputs, Prepared, Runner, TensorSpec, as_feed, check_batch, random_inputs


class TorchRunner(Runner):
    backend = "pytorch"

    def __init__(self, module, input_shape, device=None, metadata=None, input_name="input", output_name="logits",
                 threads=None, model_path=None, output_names=None):
        """input_shape: the per-sample shape, e.g. (3, 64, 64); device: "cpu", "cuda", "auto" (CUDA where there is
        one) or None for the module's; threads: torch's intra-op threads (None: torch's default); output_names:
        the names of the module's outputs in order (a tensor, a tuple/list, or a dict in that order), default
        (output_name,)."""
        Runner.__init__(self)
        self.module = module
        self.threads = threads
        self.model_path = model_path
        self.input_shape = tuple(int(d) for d in input_shape)
        self.device = device
        self.metadata = dict(metadata or {})
        self._inputs = [TensorSpec(input_name, (-1,) + self.input_shape, np.dtype(np.float32))]
        names = list(output_names) if output_names else [output_name]
        self._outputs = [TensorSpec(n, (-1, -1), np.dtype(np.float32)) for n in names]

    def load(self):
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable("the PyTorch backend needs torch (host only)") from e
        self._torch = torch
        if self.threads:
            torch.set_num_threads(int(self.threads))
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device is None:
            try:
                self.device = str(next(self.module.parameters()).device)
            except StopIteration:
                self.device = "cpu"
        self.module = self.module.to(self.device).eval()
        self._cuda = str(self.device).startswith("cuda")
        self.info = {"backend": self.backend, "provider": str(self.device), "precision": "fp32",
                     "torch": torch.__version__, "threads": torch.get_num_threads()}
        self.loaded = True
        return self

    def _forward(self, x):
        torch = self._torch
        with torch.no_grad():
            return self.module(x)

    def _named(self, y):
        """(names, tensors) of a module's result: a tensor, a tuple/list of tensors, or a dict of them."""
        declared = [s.name for s in self._outputs]
        if isinstance(y, dict):
            names = declared if all(n in y for n in declared) else list(y)
            return names, [y[n] for n in names]
        tensors = list(y) if isinstance(y, (tuple, list)) else [y]
        names = declared[:len(tensors)] + ["output{}".format(i) for i in range(len(declared), len(tensors))]
        return names, tensors

    def infer(self, feed):
        feed = as_feed(self, feed)
        torch = self._torch
        x = torch.from_numpy(feed[self._inputs[0].name]).to(self.device)
        names, tensors = self._named(self._forward(x))
        return Outputs(names, [t.float().cpu().numpy() for t in tensors])

    def prepare(self, batch, cuda_graph=False, spin_wait=False):
        check_batch(self, batch)
        torch = self._torch
        x = torch.from_numpy(random_inputs(self._inputs, batch)[self._inputs[0].name]).to(self.device)
        forward = self._forward
        sync = torch.cuda.synchronize if self._cuda else None

        def run():
            forward(x)
            if sync is not None:
                sync()

        return Prepared(run, batch)

    def close(self):
        self.loaded = False
