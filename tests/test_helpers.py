"""The test helpers whose mistakes would hide the scripts': here, reading a resumed run's scalars."""

import glob
import os

import helpers
from torch.utils.tensorboard import SummaryWriter


def test_scalar_steps_reads_a_resumed_runs_files_in_the_order_written_whatever_their_names(tmp_path):
    """A run to step 64, resumed from its step 32 (purge_step 33, as the scripts resume): steps 48 and 64 are the
    resume's. Renamed as two files of one second, the first from a subprocess (a later pid than the test process's,
    which resumes), TensorBoard's name order would read the resume first."""
    run_dir = str(tmp_path / "runs" / "a")
    for value, purge_step, steps in ((0.0, None, range(16, 65, 16)), (1.0, 33, range(48, 97, 16))):
        with SummaryWriter(run_dir, purge_step=purge_step) as writer:
            for step in steps:
                writer.add_scalar("x", value, step)
    expected = [(16, 0.0), (32, 0.0), (48, 1.0), (64, 1.0), (80, 1.0), (96, 1.0)]
    assert helpers.scalar_steps(run_dir)["x"] == expected
    first, resumed = sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")))
    os.rename(first, os.path.join(run_dir, "events.out.tfevents.1700000000.host.2000.0"))
    os.rename(resumed, os.path.join(run_dir, "events.out.tfevents.1700000000.host.1000.1"))
    assert helpers.scalar_steps(run_dir)["x"] == expected
