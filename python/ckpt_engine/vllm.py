"""vLLM worker extension: each vLLM worker takes ckpt-engine updates in place.

    LLM(model=..., worker_extension_cls="ckpt_engine.vllm.CkptEngineExtension")
    # or: python -m vllm.entrypoints.openai.api_server ... \
    #         --worker-extension-cls ckpt_engine.vllm.CkptEngineExtension

Every vLLM worker then has two methods, reachable through `collective_rpc` (offline) or
the server's `POST /collective_rpc` (VLLM_SERVER_DEV_MODE=1), which is what
`ckpt-engine update NAME --update-url http://HOST:PORT/collective_rpc` calls:

- `ckpt_engine_update(socket_paths=None, socket_dir=None, ...)`: connects this worker to
  its engine rank's socket (`socket_paths[str(worker rank)]`, else
  `socket_dir/rank-<worker rank>.sock`), takes one update and streams its buckets as
  zero-copy torch tensors into vLLM's in-place reload
  (`model_runner.reload_weights(weights_iterator=..., is_checkpoint_format=True)`, which
  re-runs vLLM's own weight processing: CPU repacking, quantized layouts). Returns a dict
  with the version and counts; raises `CkptUpdateIncomplete` when the update did not
  complete (the model may then hold mixed weights: see `ckpt_engine_status`).
- `ckpt_engine_status()`: `{"state": "none"|"consistent"|"incomplete", "version", ...}`.

Zero copy, and when it copies: a bucket's tensors are views of the engine's shared
memory. In a direct update (every engine rank on this host, the default) they point
straight into the owners' pools, which nothing writes during an update (BEGIN's STABLE
flag): vLLM may keep them as long as it likes and nothing is ever copied. In a staged
update (several hosts, P2P, `direct=0`) they point into an IPC buffer that the engine
refills once the bucket is acknowledged, and vLLM's layer-wise reload keeps a layer's
weights until the whole layer has arrived (q, k and v for one fused qkv_proj; gate and up
for gate_up_proj; every expert of a fused MoE layer). So before such a bucket is
acknowledged the extension checks, through a weak reference per tensor, whether vLLM
still holds any of its views; each one it holds is copied into private memory first
(`tensor.data = tensor.clone()`, so the reference vLLM holds sees the copy). The result
counts them (`copied_tensors`, `copied_bytes`). Buckets follow the layer order within each
owner rank, so only layers cut by a bucket boundary, or split across owner ranks, are
copied; everything else is read straight out of shared memory by vLLM's own loaders.

After a complete update the extension resets nothing in the scheduler (a worker cannot
reach it): the caller resets vLLM's prefix cache — `update(llm, ...)` below does it for an
offline `LLM`, and `ckpt-engine update --update-url` pauses vLLM with its cache cleared
(`/pause`) and resumes it only after a complete update.
"""
import os
import time
import warnings
import weakref

import numpy as np

from .receiver import CkptError, Receiver, lib

# safetensors dtype -> torch dtype name; the numpy view the receiver gives is reinterpreted.
_TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}

_EPEER = -8  # CKPT_EPEER: the engine went away
_EINVAL = -1  # CKPT_EINVAL: the update's manifest does not cover the model

# Observers called in the worker process as f(update_id, bucket) after each bucket is
# acknowledged (progress reporting; the tests use it to kill the engine mid-update).
AFTER_BUCKET = []


class CkptUpdateIncomplete(RuntimeError):
    """The update did not complete; the worker's weights may be mixed."""


class CkptUpdateRefused(RuntimeError):
    """The update was refused before any byte landed (its tensors do not cover the model
    and it is not partial); the worker's weights are unchanged."""


class _HeldView(RuntimeError):
    """vLLM holds a view into a bucket that must be released."""


def _torch_dtype(torch, st_dtype):
    name = _TORCH_DTYPES.get(st_dtype)
    dt = getattr(torch, name, None) if name else None
    if dt is None:
        raise CkptError(-22, "dtype %s has no torch equivalent in this torch" % st_dtype)
    return dt


class _BucketStream:
    """The weights iterator handed to vLLM: yields (name, tensor) for every tensor of every
    bucket; acknowledges bucket b only when vLLM has asked for what comes after it and no
    longer holds a view of its bytes (copying the views it still holds)."""

    def __init__(self, torch, rx, info, timeout_ms):
        self.torch = torch
        self.rx = rx
        self.nbuckets = info.nbuckets
        # Stable buffers (a direct update: the owners' pools) keep their bytes until the
        # update ends, so views vLLM still holds need no copy when a bucket is acknowledged.
        self.stable = bool(info.stable)
        # The engine asks for verification (`update NAME verify=1`): every tensor's XXH3-64
        # is checked in the shared buffer before vLLM sees it (one extra read pass).
        self.verify = bool(info.verify)
        self.timeout_ms = timeout_ms
        self.tensors = 0
        self.bytes = 0
        self.copied_tensors = 0
        self.copied_bytes = 0
        self.buckets = 0
        self.error = None      # why the stream stopped early (engine abort, lost engine)
        self.ended = None      # 'abort' when the engine aborted during the stream
        self.broken = False    # the connection can no longer be trusted (lost, timed out)
        self.on_bucket = None  # called with the bucket index after each acknowledgement
        self.wait_s = 0.0      # time spent waiting for the engine's next bucket
        self.seen = {}         # name -> (dtype, shape) of every tensor streamed
        self.on_gpu = False    # views in GPU memory: copies queued there, waited for at ack

    def _views(self, views):
        """Zero-copy torch tensors over the shared buffer, each with a weak reference to
        the numpy array whose memory it uses (alive as long as any view of it is)."""
        torch = self.torch
        out = []
        for v in views:
            if v.memory == "cuda":  # the engine rank's GPU buffer, opened by IPC handle
                t = v.torch()
                self.on_gpu = True
                out.append((v.name, t, weakref.ref(t), weakref.ref(t), v.nbytes))
                continue
            arr = v.numpy()
            with warnings.catch_warnings():
                # read-only on purpose: vLLM's loaders copy out of it, never write it
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(arr)
            want = _torch_dtype(torch, v.dtype)
            if t.dtype != want:  # BF16 / F8 arrive as raw unsigned integers of the width
                t = t.view(want)
            out.append((v.name, t, weakref.ref(arr), weakref.ref(t), v.nbytes))
        return out

    def _release(self, held):
        """Makes sure vLLM keeps no reference into the shared buffer: a tensor it still
        holds gets a private copy of its bytes."""
        import gc
        if any(r() is not None for _, _, r, _, _ in held):
            gc.collect()  # reference cycles in the loader may hold views a little longer
        for name, _, raw_ref, t_ref, nbytes in held:
            if raw_ref() is None:
                continue
            t = t_ref()
            if t is not None:
                t.data = t.clone()
                self.copied_tensors += 1
                self.copied_bytes += nbytes
            if raw_ref() is not None:
                # A view made from the tensor still points into the buffer and cannot be
                # redirected: acknowledging would let the engine overwrite bytes vLLM reads.
                raise _HeldView("vLLM keeps a view of '%s' from a finished bucket; "
                                "cannot release the engine's buffer" % name)

    def __iter__(self):
        for _ in range(self.nbuckets):
            t0 = time.perf_counter()
            try:
                kind, bucket, views = self.rx.next(self.timeout_ms)
            except CkptError as e:
                self.error, self.broken = str(e), True
                return
            self.wait_s += time.perf_counter() - t0
            if kind != "bucket":
                self.ended = kind
                self.error = "the engine ended the update early (%s): %s" % (
                    kind, (lib().ckpt_receiver_reason(self.rx._h) or b"").decode(errors="replace"))
                return
            if self.verify:
                bad = next((v for v in views if lib().ckpt_receiver_verify(v._ptr) < 0), None)
                if bad is not None:
                    self.error = "bucket %d: %s" % (bucket, lib().ckpt_last_error().decode(
                        errors="replace"))
                    try:
                        self.rx.fail(self.error)
                    except CkptError:
                        pass
                    return
            held = self._views(views)
            views_meta = [(v.dtype, v.shape) for v in views]
            views = None
            for i in range(len(held)):
                name, t = held[i][0], held[i][1]
                # drop our strong reference before handing it over
                held[i] = (name, None, held[i][2], held[i][3], held[i][4])
                self.tensors += 1
                self.bytes += held[i][4]
                self.seen[name] = (views_meta[i][0], views_meta[i][1])
                yield name, t
                del t
            try:
                if not self.stable:
                    self._release(held)
            except _HeldView as e:
                self.error = str(e)
                try:
                    self.rx.fail(self.error)
                except CkptError:
                    pass
                return
            self.buckets += 1
            if self.on_gpu:  # vLLM's copies out of the device buffer are queued: wait for
                self.torch.cuda.synchronize()  # them before the engine may refill it
            try:
                self.rx.ack()
            except CkptError as e:
                self.error, self.broken = str(e), True
                return
            if self.on_bucket:
                self.on_bucket(bucket)


def _recover_layerwise_reload(model):
    """After vLLM's layer-wise reload raised (a tensor vLLM refused), its layers are left in
    the reload state: parameters on the meta device, weight loaders wrapped, refused
    tensors buffered. The next reload would process those leftovers. This puts every layer
    back on its own tensors (already-processed layers keep the new values, the others the
    old ones: the model is mixed, and the status says so) and clears the reload state, so
    the next update starts clean. vLLM 0.32 internals; returns the error text if that
    failed (then only a restart of vLLM helps)."""
    try:
        from vllm.model_executor.model_loader.reload import layerwise as lw
        for layer in model.modules():
            info = lw.LAYERWISE_INFO.get(layer)
            if info is None or not info.can_load():
                continue
            for t in lw.get_layer_tensors(layer).values():
                if hasattr(t, "weight_loader"):
                    t.weight_loader = lw._get_original_loader(t)
            if info.kernel_tensors is not None:
                lw._place_kernel_tensors(layer, info)
            info.reset()
        lw.LOADING_LAYERS.clear()
        if hasattr(model, "_original_do_torchao_reload"):
            model._do_torchao_reload = model._original_do_torchao_reload
        return None
    except Exception as e:  # noqa: BLE001
        return "%s: %s" % (type(e).__name__, e)


class CkptEngineExtension:
    """Mixed into vLLM's worker class by `worker_extension_cls`. Method names carry the
    `ckpt_engine_` prefix: vLLM's worker already has update_weights / reload_weights."""

    _ckpt_rx = None
    _ckpt_path = None
    _ckpt_state = None
    # The checkpoint's tensors (name -> (dtype, shape)) as the last complete, non-partial
    # update delivered them: later updates must cover exactly these (Receiver.set_model),
    # or they are refused before a byte lands and vLLM keeps serving consistent weights.
    # Unknown before the first complete update (vLLM loaded its weights itself).
    _ckpt_model = None

    def _ckpt_status(self):
        if self._ckpt_state is None:
            self._ckpt_state = {"state": "none", "version": 0, "update_id": 0, "name": "",
                                "reason": "", "socket": ""}
        return self._ckpt_state

    def _ckpt_socket(self, socket_paths, socket_dir):
        rank = int(getattr(self, "rank", 0) or 0)
        if socket_paths:
            if isinstance(socket_paths, str):
                import json
                socket_paths = json.loads(socket_paths)
            if isinstance(socket_paths, (list, tuple)):
                socket_paths = {str(i): p for i, p in enumerate(socket_paths)}
            path = socket_paths.get(str(rank))
            if not path:
                raise ValueError("ckpt_engine_update: socket_paths has no entry for vLLM "
                                 "worker rank %d (keys: %s)" % (rank, sorted(socket_paths)))
            return path
        if not socket_dir:
            socket_dir = os.environ.get("CKPT_SOCKET_DIR")
        if not socket_dir:
            raise ValueError("ckpt_engine_update needs socket_paths or socket_dir (or "
                             "CKPT_SOCKET_DIR): where the engine ranks' sockets are")
        return os.path.join(socket_dir, "rank-%d.sock" % rank)

    def _ckpt_connect(self, path, timeout_ms):
        if self._ckpt_rx is not None and self._ckpt_path == path:
            return self._ckpt_rx
        if self._ckpt_rx is not None:
            self._ckpt_rx.close()
            self._ckpt_rx = None
        self._ckpt_rx = Receiver.connect(path, timeout_ms)
        self._ckpt_path = path
        if self._ckpt_model:
            self._ckpt_rx.set_model(self._ckpt_model)
        return self._ckpt_rx

    def _ckpt_drop(self):
        if self._ckpt_rx is not None:
            self._ckpt_rx.close()
        self._ckpt_rx = None
        self._ckpt_path = None

    def ckpt_engine_update(self, socket_paths=None, socket_dir=None, update_id=None,
                           name=None, version=None, timeout_s=None, **_ignored):
        """Takes one update from this worker's engine rank into the model, in place."""
        import torch

        timeout_ms = int(float(timeout_s) * 1000) if timeout_s else 60000
        st = self._ckpt_status()
        path = self._ckpt_socket(socket_paths, socket_dir)
        st["socket"] = path
        t_start = time.perf_counter()
        try:
            try:
                rx = self._ckpt_connect(path, timeout_ms)
                info = rx.wait_update(timeout_ms)
            except CkptError as e:
                if e.status != _EPEER:
                    raise
                # A connection left over from an engine that has gone: one fresh attempt.
                self._ckpt_drop()
                rx = self._ckpt_connect(path, timeout_ms)
                info = rx.wait_update(timeout_ms)
        except CkptError as e:
            if e.status != _EINVAL:
                raise
            # The update does not cover the model (and is not partial): refused before
            # any byte landed; the weights, and the state, are what they were.
            raise CkptUpdateRefused(
                "ckpt-engine update refused on vLLM worker %d before any byte landed; the "
                "model is unchanged (%s at version %d): %s"
                % (int(getattr(self, "rank", 0) or 0), st["state"], st["version"], e)) from None
        t_begin = time.perf_counter()
        uname = info.name.decode()
        st.update({"state": "updating", "update_id": info.update_id, "name": uname,
                   "reason": ""})
        if update_id is not None and int(update_id) != info.update_id:
            # A stale or foreign trigger: still take the update the engine is running,
            # which is the one this worker's bytes come from; note it.
            st["reason"] = "trigger named update %s, engine runs %d" % (update_id,
                                                                       info.update_id)
        stream = _BucketStream(torch, rx, info, timeout_ms)
        if AFTER_BUCKET:
            stream.on_bucket = lambda b: [f(info.update_id, b) for f in list(AFTER_BUCKET)]
        runner = self.model_runner
        reload_error = None
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                if hasattr(runner, "reload_weights"):
                    runner.reload_weights(weights_iterator=iter(stream),
                                          is_checkpoint_format=True)
                else:  # older vLLM: plain load_weights (no repacking: GPU workers only)
                    runner.get_model().load_weights(weights=iter(stream))
        except Exception as e:  # noqa: BLE001 - reported to the engine and the caller
            reload_error = "vLLM reload: %s: %s" % (type(e).__name__, e)
            stuck = _recover_layerwise_reload(runner.get_model())
            if stuck:
                reload_error += "; vLLM's reload state could not be reset (%s): restart " \
                                "vLLM" % stuck
        t_reload = time.perf_counter() - t0
        completed, reason = False, ""
        try:
            if reload_error and stream.error is None:
                # vLLM failed on a bucket: tell the engine, which aborts the update.
                try:
                    rx.fail(reload_error[:900])
                except CkptError:
                    pass
            if stream.ended == "abort":
                kind = "abort"  # the receiver already answered the ABORT
            elif stream.broken:
                kind = "lost"
            else:
                kind, _, _ = rx.next(timeout_ms)
            if kind == "finish":
                # finish_reply waits for the engine's decision (protocol 3): complete only
                # on COMMIT; ABORT (another worker failed or died) raises ECANCELED.
                if reload_error or stream.error:
                    reason = reload_error or stream.error
                    try:
                        rx.finish_reply(False, reason[:900])
                    except CkptError as e:
                        if e.status != -17:  # CKPT_ECANCELED: the expected ABORT
                            raise
                else:
                    try:
                        rx.finish_reply(True)
                        completed = True
                    except CkptError as e:
                        if e.status != -17:
                            raise
                        reason = (lib().ckpt_receiver_reason(rx._h) or b"").decode(
                            errors="replace") or str(e)
            elif kind == "abort":
                reason = (lib().ckpt_receiver_reason(rx._h) or b"").decode(errors="replace") \
                    or stream.error or reload_error or "aborted"
            else:
                reason = stream.error
                self._ckpt_drop()
        except CkptError as e:
            reason = stream.error or reload_error or str(e)
            self._ckpt_drop()
        if completed:
            st.update({"state": "consistent", "version": info.version, "reason": ""})
            if not info.partial:
                self._ckpt_model = dict(stream.seen)
                rx.set_model(self._ckpt_model)
        else:
            st.update({"state": "incomplete", "reason": reason})
        result = {
            "completed": completed, "update_id": info.update_id, "name": uname,
            "version": info.version, "worker_rank": int(getattr(self, "rank", 0) or 0),
            "tensors": stream.tensors, "bytes": stream.bytes, "buckets": stream.buckets,
            "copied_tensors": stream.copied_tensors, "copied_bytes": stream.copied_bytes,
            "wait_s": round(t_begin - t_start, 6), "reload_s": round(t_reload, 6),
            "engine_wait_s": round(stream.wait_s, 6),
            "total_s": round(time.perf_counter() - t_start, 6), "reason": reason,
        }
        if not completed:
            raise CkptUpdateIncomplete(
                "ckpt-engine update %d of '%s' is incomplete on vLLM worker %d: %s; the "
                "model may hold mixed weights until the next complete update"
                % (info.update_id, uname, result["worker_rank"], reason))
        return result

    def ckpt_engine_status(self):
        """This worker's weight version and state: none (no update yet), updating,
        consistent (the last update completed) or incomplete (weights may be mixed)."""
        return dict(self._ckpt_status())


def update(llm, socket_dir=None, socket_paths=None, timeout_s=None):
    """Offline helper: updates every worker of a `vllm.LLM` in place and resets its prefix
    cache (KV blocks computed with the old weights must not be reused). Returns the list of
    per-worker results; raises when any worker's update is incomplete (generation must then
    wait for a complete update)."""
    kwargs = {"socket_dir": socket_dir, "socket_paths": socket_paths, "timeout_s": timeout_s}
    results = llm.collective_rpc("ckpt_engine_update", kwargs=kwargs)
    llm.reset_prefix_cache()
    return results
