"""The suite runs on 2 workers (pytest.ini: -n 2, one test file per worker so that module fixtures run once).
Each worker and every script it starts then uses one thread: two OpenMP pools spinning on two cores ran many
times slower than one thread each."""

import os

for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(name, "1")
