"""Device runtime of rsedge: run, benchmark and evaluate exported models on a Jetson or any box.

This package must import on a Jetson TX2 with Python 3.6 and nothing but numpy installed, so
nothing here imports torch or onnx, and every optional library (TensorRT, pycuda, cuda-python,
onnxruntime, pynvml, Pillow) is imported inside the function that needs it. It imports none of
the other rsedge packages either: the same folder is all a device needs.
"""

__version__ = "0.1.0"
