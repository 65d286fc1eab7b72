"""ONNX Runtime (CPU provider, one thread) on a batch of 8 read in place from a handed-over
buffer, against the same batch as its own array and as a copy of the view (docs/benchmarks.md,
"Inputs handed over in shared memory"). From the checkout:

    python docs/fastpath-handoff/read_in_place.py
"""

import time

import numpy as np
import onnxruntime as ort

from deployments.handoff import Inbox, Outbox
from engines.models import resolve

options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(str(resolve("resnet50").path), options,
                               providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
batch = np.random.rand(8, 3, 224, 224).astype(np.float32)
outbox = Outbox()
lent = outbox.lend({name: batch})
assert lent is not None
view = Inbox().arrays(lent.shared)[name]
for round_ in range(3):
    for kind in ("numpy", "memfd view", "copy of view"):
        started = time.perf_counter()
        for _ in range(3):
            feed = {"numpy": batch, "memfd view": view}.get(kind)
            session.run(None, {name: np.array(view) if feed is None else feed})
        print(round_, kind, round((time.perf_counter() - started) / 3 * 1000, 1), "ms")
outbox.close()
