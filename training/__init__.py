"""Training of the adapter (and the visual projection): the package behind ``train.py``.

One idea a module: ``config`` (settings and recipes), ``cli`` (command line), ``migration`` (settings recorded by
earlier versions), ``dist`` (processes and devices),
``batching``, ``optim`` (optimizer and schedule), ``state`` (the run directory: RNG, position, save / load, resume),
``metrics`` (metrics.jsonl, TensorBoard, the loss curve), ``trainer`` (one optimizer step, NaN / OOM / signals) and
``run`` (one run from settings to the evaluated adapter).
"""


class TrainingError(RuntimeError):
    """A run cannot go on; the message says why and what to try. train.py prints it without a traceback."""
