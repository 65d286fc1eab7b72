"""The engine-free model of docs/benchmarks.md: ResNet-50's input and output ([N,3,224,224] in,
[N,1000] out), computed by Flatten then Slice of the first 1,000 values, so that a request
carries 600 KB and the engine costs almost nothing.

    python docs/fastpath-byvalue/make_wide.py /tmp/wide/wide.onnx
"""

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

bounds = [numpy_helper.from_array(np.array([v], np.int64), name)
          for name, v in (("starts", 0), ("ends", 1000), ("axes", 1))]
graph = helper.make_graph(
    [helper.make_node("Flatten", ["data"], ["flat"], axis=1),
     helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["out"])],
    "wide",
    [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 224, 224])],
    [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1000])],
    bounds,
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, sys.argv[1])
