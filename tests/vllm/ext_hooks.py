"""A hook for tests: kills the engine job after the first bucket reached vLLM (vLLM runs
in this process, so the test sets KILL_PIDS before the update)."""
import os
import signal

from ckpt_engine import vllm as ckv

KILL_PIDS = []
KILLED = []


def _kill_after_first_bucket(update_id, bucket):
    if bucket == 0 and KILL_PIDS:
        for pid in KILL_PIDS:
            os.kill(pid, signal.SIGKILL)
        KILLED.extend(KILL_PIDS)
        KILL_PIDS.clear()


ckv.AFTER_BUCKET.append(_kill_after_first_bucket)
