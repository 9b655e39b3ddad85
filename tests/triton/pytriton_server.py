"""Serve the telemetry anomaly model through a real Triton server (PyTriton, CPU) for tests and demos.

Runs under the PyTriton virtualenv (numpy<2), not the gateway's: it imports only numpy, PyTriton
and ``connectors.inference.models.anomaly`` (numpy-only by design), so the scores it serves come from the same
weights file and the same forward pass as ``LocalModelInferencer``.

    .venv-triton/bin/python tests/triton/pytriton_server.py --http-port 8000 --grpc-port 8001 \
        --metrics-port 8002 [--mode normal|slow|failing] [--sleep-ms N] [--fail-every N] \
        [--max-queue-size N] [--workspace DIR] [--load-when-exists PATH]

Start it with ``LD_LIBRARY_PATH`` set to this interpreter's ``sysconfig.get_config_var('LIBDIR')``:
the Python backend stub links libpython. Modes: ``slow`` sleeps ``--sleep-ms`` (default 200) in every
model call; ``failing`` raises in every ``--fail-every``-th call (default every call), which Triton
returns as an internal error. ``--max-queue-size`` bounds Triton's queue, so excess concurrent
requests are rejected with UNAVAILABLE "Exceeds maximum queue size" (HTTP 503). With
``--load-when-exists PATH`` the server comes up live with no model, and loads the model only once
PATH exists: a model that is still loading, as a gateway may find it at start-up. SIGTERM or SIGINT
stop the server cleanly (Triton, its model processes, and the workspace).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import sys
import threading
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO_ROOT)

from connectors.inference.models.anomaly import DEFAULT_WEIGHTS_PATH, AnomalyModel  # noqa: E402
from pytriton.decorators import batch  # noqa: E402
from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor  # noqa: E402
from pytriton.triton import Triton, TritonConfig  # noqa: E402

MAX_BATCH_SIZE = 1024


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the telemetry anomaly model with PyTriton.")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS_PATH)
    parser.add_argument("--mode", choices=("normal", "slow", "failing"), default="normal")
    parser.add_argument("--sleep-ms", type=float, default=None, help="per-call sleep (default 200 in slow mode)")
    parser.add_argument("--fail-every", type=int, default=None, help="fail every Nth call (default 1 in failing mode)")
    parser.add_argument("--max-queue-size", type=int, default=0, help="0 = unbounded")
    parser.add_argument("--max-queue-delay-us", type=int, default=0)
    parser.add_argument("--workspace", default=None, help="PyTriton workspace (removed on exit)")
    parser.add_argument("--load-when-exists", default=None, help="load the model only once this path exists")
    return parser.parse_args(argv)


def _make_infer(model: AnomalyModel, sleep_secs: float, fail_every: int):
    calls = itertools.count(1)

    @batch
    def infer(features: np.ndarray) -> dict[str, np.ndarray]:
        call = next(calls)
        if sleep_secs > 0:
            time.sleep(sleep_secs)
        if fail_every > 0 and call % fail_every == 0:
            raise RuntimeError(f"injected failure in call {call}")
        scores = model.scores(features)
        labels = np.char.encode(model.labels(scores).astype(str), "utf-8")
        return {"score": scores.reshape(-1, 1), "label": labels.reshape(-1, 1)}

    return infer


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sleep_ms = args.sleep_ms if args.sleep_ms is not None else (200.0 if args.mode == "slow" else 0.0)
    fail_every = args.fail_every if args.fail_every is not None else (1 if args.mode == "failing" else 0)
    model = AnomalyModel.load(args.weights)

    stop = threading.Event()
    # PyTriton only handles KeyboardInterrupt; turn SIGTERM into an orderly stop so that Triton and the
    # model's stub processes do not outlive this process.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    config = TritonConfig(
        http_address=args.address,
        http_port=args.http_port,
        grpc_address=args.address,
        grpc_port=args.grpc_port,
        metrics_address=args.address,
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        exit_timeout_secs=2,
    )
    queue_policy = QueuePolicy(max_queue_size=args.max_queue_size) if args.max_queue_size > 0 else None
    batcher = DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us, default_queue_policy=queue_policy)
    with Triton(config=config, workspace=args.workspace) as triton:  # the server is live from here on
        if args.load_when_exists:
            logging.info("server up; loading the model once %s exists", args.load_when_exists)
            while not os.path.exists(args.load_when_exists):
                if stop.wait(0.05):
                    return 0
        triton.bind(
            model_name=model.name,
            model_version=int(model.version),
            infer_func=_make_infer(model, sleep_ms / 1000.0, fail_every),
            inputs=[Tensor(name="features", dtype=np.float32, shape=(model.n_features,))],
            outputs=[
                Tensor(name="score", dtype=np.float32, shape=(1,)),
                Tensor(name="label", dtype=bytes, shape=(1,)),
            ],
            config=ModelConfig(max_batch_size=MAX_BATCH_SIZE, batcher=batcher),
            strict=True,
        )
        logging.info("serving %s (mode=%s) on http %d, grpc %d", model.name, args.mode, args.http_port, args.grpc_port)
        while not stop.wait(0.5):
            if not triton.is_alive():
                logging.error("Triton or the model process died")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
