"""tests/gpu: the GPU path with a torch worker. The sim tests need torch (CPU is enough) and
run in CI through tests/gpu/run-gpu-tests (the vLLM virtualenv has torch); the CUDA tests
skip, saying so, where no GPU is visible, and run on a GPU machine (scripts/gpu-check)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "python"), os.path.join(HERE, "..", "..", "python")]
