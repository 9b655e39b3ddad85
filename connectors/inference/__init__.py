"""Scoring backends behind one protocol, and the pool that spreads batches over them.

    base.py            the ``Inferencer`` protocol, ``InferenceOutput``, ``ShapedBatch`` and
                       ``inference_fields`` (records in, one ``inference`` field per record out)
    local_model.py     ``LocalModelInferencer``: the anomaly model in process (the default run)
    triton.py          ``TritonInferencer`` and ``TritonSettings``: one Triton endpoint (the ``triton`` extra)
    pool.py            ``InferencePool``: several endpoints with readiness, breakers, failover and a retry budget
    breaker.py         the circuit breaker per endpoint
    endpoint_health.py readiness probes and their schedule
    retry_budget.py    the pool's retry budget
    pool_batching.py   how ``batching.Batcher`` drives a pool
    models/            the telemetry anomaly model, its weights (``telemetry_anomaly.npz``) and its trainer

Every backend raises the errors in ``connectors.errors``. Nothing is imported here, so importing one
module (e.g. ``models.anomaly`` inside the PyTriton test server's numpy<2 interpreter) pulls in no other.
"""
