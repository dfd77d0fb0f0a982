"""The suite runs on 2 workers (pytest.ini: -n 2 --dist loadfile), one test file per worker so that module fixtures
run once, except tests/test_every_script.py: one work unit per script there (its module fixtures are per script), so
that its claims spread over both workers. Each worker and every script it starts then uses one thread: two OpenMP
pools spinning on two cores ran many times slower than one thread each."""

import os
import re

import pytest

for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(name, "1")

EVERY_SCRIPT = re.compile(r"(.*test_every_script\.py)::\w+\[(\w+)")  # the script's id comes first


def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with tests/test_every_script.py split by script."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ByFileAndScript(LoadFileScheduling):
        def _split_scope(self, nodeid):
            match = EVERY_SCRIPT.match(nodeid)
            return f"{match[1]}::{match[2]}" if match else super()._split_scope(nodeid)

    return ByFileAndScript(config, log)


@pytest.fixture(scope="module")
def quick(request, tmp_path_factory):
    """The `--quick` study of the test module's RUNNER, as CI runs it (helpers.quick_study)."""
    import helpers

    return helpers.quick_study(request.module.RUNNER, tmp_path_factory)
