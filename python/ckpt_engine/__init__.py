"""ckpt-engine for Python: the receiver side that inference workers (vLLM, SGLang, or your
own) use to take weight updates from their engine rank, through ctypes over libckpt.so.

    from ckpt_engine import Receiver
    with Receiver.connect("/tmp/s/rank-0.sock") as rx:
        info = rx.apply_update(params)   # params: {name: writable numpy array}
        # info.completed tells whether the whole update arrived (else nothing is trusted)

A worker that should outlive engine restarts iterates `follow(socket_path, params)`: one
UpdateResult per update, reconnecting (waiting forever by default) whenever the engine goes.

Tensor views are zero-copy numpy arrays over the engine's shared buffers, valid until the
bucket is answered. From an engine rank on a GPU (serve --device cuda) the views are in
that GPU's memory, opened by CUDA IPC handle: `view.torch()` is a zero-copy torch tensor on
the device, and apply_update fills torch tensors on the GPU device to device (torch is
imported only then). Dtypes numpy lacks (BF16, F8_*) come as raw unsigned integers of the
same width; copy them bytewise (what an inference engine does with its own tensors).

A worker holding part of the model (a TP/PP/EP shard) says what it needs:
`rx.declare_need(layout_needs(model, tp=2, rank=r))` (docs/PROTOCOL.md, "Needs").

Trainers publish checkpoints from memory with `publish(name, tensors, socket_dir=...)`
(publish.py, docs/PUBLISH.md).
"""
from .receiver import CkptError, Receiver, TensorView, UpdateResult, follow, layout_needs
from .publish import PublishResult, publish

__all__ = ["CkptError", "PublishResult", "Receiver", "TensorView", "UpdateResult", "follow",
           "layout_needs", "publish"]
