"""Building TensorRT engines on the device: the builder, the TensorRT version adapter, engine sidecars
and the ONNX metadata reader they need."""
