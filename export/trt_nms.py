"""`rsedge export --nms trt`: TensorRT's EfficientNMS_TRT plugin appended to a detector's graph, so
the engine returns final detections and the device runs no NMS of its own.

The plugin (TensorRT >= 8.0, JetPack 4.6 onwards) takes the graph's `boxes` (N, A, 4) corners in
input pixels (box_coding 0) and `scores` (N, A, C) already activated (score_activation 0), and
writes `num_dets` (N, 1) int32, `det_boxes` (N, K, 4), `det_scores` (N, K), `det_classes` (N, K)
int32, K = max_output_boxes. NMS is per class unless `class_agnostic`, an attribute TensorRT
reads only from 8.6 (JetPack 6): the record states the TensorRT version the file needs.

ONNX Runtime has no such operator: the graph with the plugin is a second file
(`model_nms_trt.onnx`), written after the parity check of the plain graph, for TensorRT only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLUGIN = "EfficientNMS_TRT"
OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
NMS_FILE = "model_nms_trt.onnx"


@dataclass
class NmsOptions:
    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    max_output_boxes: int = 100
    class_agnostic: bool = False

    def check(self) -> None:
        if not 0 <= self.score_threshold < 1:
            raise ValueError(f"NMS score threshold must be in [0, 1), not {self.score_threshold}")
        if not 0 < self.iou_threshold <= 1:
            raise ValueError(f"NMS IoU threshold must be in (0, 1], not {self.iou_threshold}")
        if self.max_output_boxes < 1:
            raise ValueError(f"--max-det must be at least 1, not {self.max_output_boxes}")

    def min_tensorrt(self) -> str:
        return "8.6" if self.class_agnostic else "8.0"


def append_efficient_nms(src: str | Path, dst: str | Path, options: NmsOptions | None = None) -> dict[str, Any]:
    """Write `dst`: the graph of `src` with EfficientNMS_TRT on its `boxes` and `scores`."""
    import onnx
    from onnx import TensorProto, helper

    from .onnx_export import set_metadata

    o = options or NmsOptions()
    o.check()
    model = onnx.load(str(src))
    graph = model.graph
    names = [out.name for out in graph.output]
    if names[:2] != ["boxes", "scores"]:
        raise ValueError(f"{src} has outputs {names}, not a detector's (boxes, scores)")
    batch = graph.output[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_value if batch.HasField("dim_value") else batch.dim_param
    attrs = {"plugin_version": "1", "background_class": -1, "max_output_boxes": int(o.max_output_boxes),
             "score_threshold": float(o.score_threshold), "iou_threshold": float(o.iou_threshold),
             "score_activation": 0, "box_coding": 0}
    if o.class_agnostic:
        attrs["class_agnostic"] = 1
    graph.node.append(helper.make_node(PLUGIN, ["boxes", "scores"], list(OUTPUTS), name="efficient_nms", **attrs))
    k = int(o.max_output_boxes)
    del graph.output[:]
    graph.output.extend([
        helper.make_tensor_value_info("num_dets", TensorProto.INT32, [batch_dim, 1]),
        helper.make_tensor_value_info("det_boxes", TensorProto.FLOAT, [batch_dim, k, 4]),
        helper.make_tensor_value_info("det_scores", TensorProto.FLOAT, [batch_dim, k]),
        helper.make_tensor_value_info("det_classes", TensorProto.INT32, [batch_dim, k]),
    ])
    set_metadata(model, {"rsedge.nms": "trt", "rsedge.max_det": str(k)})
    onnx.save(model, str(dst))
    return {"file": Path(dst).name, "plugin": PLUGIN, "outputs": list(OUTPUTS), **attrs,
            "class_agnostic": bool(o.class_agnostic), "min_tensorrt": o.min_tensorrt(),
            "note": "TensorRT only: ONNX Runtime has no EfficientNMS_TRT (use model.onnx there)"}
