"""Test-wide settings: one CPU thread per process.

The tests run many small models. With several threads per process, and two processes in the
distributed tests, the threads contend for the cores and tiny forwards become much slower.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses the tests start
torch.set_num_threads(1)
