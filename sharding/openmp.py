"""OpenMP's wait policy, set once for every entry point before torch loads OpenMP.

On 2 shared cores OpenMP's busy-waiting threads made training steps 10x slower, so train.py,
predict.py and every benchmark import this module first (``benchmarks/__init__.py`` does it
for the benchmarks). A value the user set is kept. It lives in ``sharding``, the one package
that never imports torch, so importing it cannot load OpenMP too early.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
