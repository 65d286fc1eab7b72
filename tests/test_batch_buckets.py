"""Batch buckets on ONNX Runtime (one session per batch size, batches padded with zero rows):
each request's rows come back as if it had run alone. Run on the CPU provider here; on the
CUDA provider the replicas turn them on (README, cuda_batch_buckets)."""

from __future__ import annotations

import numpy as np

from deployments.engine import batch_buckets
from engines import models
from engines.backend import LoadOptions, load_engine


def test_buckets_are_powers_of_two_up_to_the_batch_size() -> None:
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert batch_buckets(1) == (1,)


def test_a_padded_batch_answers_its_own_rows(tiny: models.ModelSource) -> None:
    engine = load_engine(tiny, "onnxruntime", LoadOptions(batch_buckets=(1, 4, 8)))
    plain = load_engine(tiny, "onnxruntime")
    assert sorted(engine.sessions) == [0, 1, 4, 8]  # 0: the session for any size
    context, reference = engine.create_context(1), plain.create_context(1)
    rng = np.random.default_rng(3)
    for rows in (1, 3, 5, 8, 11):  # exact, padded, padded, exact, past every bucket
        x = {"x": rng.standard_normal((rows, 16)).astype(np.float32)}
        got, want = context.execute(x), reference.execute(x)
        assert got["probs"].shape == (rows, 8)
        np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["probs"], models.tiny_reference(x["x"])["probs"],
                                   rtol=1e-5, atol=1e-6)
    assert engine.bucket_for(3) == 4 and engine.bucket_for(11) == 0
