"""Export: slimmed ONNX with its metadata, parity checks, INT8 Q/DQ, graph statistics.

Depends on `rsedge.compress` and `rsedge.trainer`; the device side (`rsedge.runtime`) never
imports it.
"""
