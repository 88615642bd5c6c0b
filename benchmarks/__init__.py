"""The measurements: each ``python -m benchmarks.NAME`` prints its figures and writes JSON.

Importing the package sets OpenMP's wait policy before any benchmark loads torch
(``sharding.openmp``).
"""

import sharding.openmp  # noqa: F401
