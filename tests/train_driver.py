"""Test driver: ``medad-fast`` with a per-rank record of what each training step did.

Usage (directly or under torchrun)::

    python tests/train_driver.py RECORD_DIR [--signal-at STEP SIGNAL [RANK]] -- COMMAND ARGS...

runs ``medad_fast.cli.main([COMMAND, ARGS...])`` and appends one JSON line per event to
``RECORD_DIR/rank<R>.jsonl``, flushed at once (so the record survives a SIGKILL):

* ``{"event": "step", "step", "batch", "mask", "params", "ema", "resident"}`` after every training step:
  the global step count, the image indices of the batch, a SHA-256 of the anomaly masks
  synthesised for it and of every parameter of the model after the optimiser step, and of
  the moving average of the weights (``--ema``; None without it), and how many training
  images this rank holds (``resident``);
* ``{"event": "write", "path"}`` for every file this process creates, renames or links
  (``os.open`` with ``O_CREAT``, ``os.replace``, ``os.link``: every atomic write).

``--signal-at STEP SIGNAL [RANK]`` sends SIGNAL (a name such as ``SIGKILL``) to this process
right after step STEP has been recorded (only on rank RANK when given): a crash or an
interruption at a known point of an epoch.
Nothing here is imported by the package: the hooks wrap its classes from outside.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import torch

RECORD_DIR = sys.argv[1]
RANK = int(os.environ.get("RANK", "0"))
os.makedirs(RECORD_DIR, exist_ok=True)
RECORD = open(os.path.join(RECORD_DIR, f"rank{RANK}.jsonl"), "a", buffering=1)  # noqa: SIM115


def record(**event) -> None:
    RECORD.write(json.dumps(event) + "\n")
    RECORD.flush()
    os.fsync(RECORD.fileno())


_open, _replace, _link = os.open, os.replace, os.link


def recording_open(path, flags, *args, **kwargs):
    if flags & os.O_CREAT:
        record(event="write", path=os.path.abspath(path))
    return _open(path, flags, *args, **kwargs)


def recording_replace(src, dst, *args, **kwargs):
    record(event="write", path=os.path.abspath(dst))
    return _replace(src, dst, *args, **kwargs)


def recording_link(src, dst, *args, **kwargs):
    record(event="write", path=os.path.abspath(dst))
    return _link(src, dst, *args, **kwargs)


def sha(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> int:
    args = sys.argv[2:]
    separator = args.index("--")
    options, command = args[:separator], args[separator + 1:]
    signal_step, signal_number = None, None
    if options:
        if options[0] != "--signal-at" or len(options) not in (3, 4):
            raise SystemExit(f"usage: {sys.argv[0]} RECORD_DIR [--signal-at STEP SIGNAL [RANK]] -- COMMAND...")
        if len(options) == 3 or int(options[3]) == RANK:
            signal_step, signal_number = int(options[1]), getattr(signal, options[2])

    from medad_fast import synthesis, train
    from medad_fast.cli import main as cli_main

    last_masks: list[torch.Tensor] = []
    synthesize = synthesis.AnomalySynthesizer.__call__

    def recording_synthesize(self, images, generator):
        augmented, mask = synthesize(self, images, generator)
        last_masks.append(mask)
        return augmented, mask

    train_step = train.Trainer.train_step

    def recording_train_step(self, batch_index):
        last_masks.clear()
        result = train_step(self, batch_index)
        record(event="step", step=self.state.step, batch=batch_index.tolist(), mask=sha(last_masks),
               params=sha(self.method.parameters()),
               ema=sha(self.ema.weights.values()) if self.ema is not None else None,
               resident=self.resident_images)
        if self.state.step == signal_step:
            os.kill(os.getpid(), signal_number)
        return result

    synthesis.AnomalySynthesizer.__call__ = recording_synthesize
    train.Trainer.train_step = recording_train_step
    os.open, os.replace, os.link = recording_open, recording_replace, recording_link
    return cli_main(command)


if __name__ == "__main__":
    sys.exit(main())
