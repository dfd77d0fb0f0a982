"""The claims every script (or every script of a kind) must meet, each written once and reported per script:
`test_rtrl_equals_bptt_across_chunks_with_resets[atari-chunked-7]`. The checks live in tests/claims.py and
tests/long_runs.py; what differs between the scripts is in the tables below. Each script's own file keeps what
only it has (its environments, its bad input, its runs as a user starts them)."""

import ast
import importlib
from dataclasses import dataclass

import claims as checks
import long_runs
import pytest


@dataclass(frozen=True)
class Script:
    module: str
    obs_shape: tuple
    num_actions: int
    obs_kind: type = checks.Pixels  # claims.py's sampler of its observations, for the update's reference
    other_obs_shape: tuple = ()  # another observation shape, whose stem must not fit (--init-stem-from)


SCRIPTS = {
    "atari": Script("rtrl_a2c_atari", (4, 84, 84), 4, other_obs_shape=(3, 64, 64)),
    "procgen": Script("rtrl_a2c_procgen", (3, 64, 64), 15, other_obs_shape=(4, 84, 84)),
    "minigrid": Script("rtrl_a2c_minigrid", checks.SymbolicView.shape, 3, obs_kind=checks.SymbolicView),
    "impala": Script("rtrl_impala_dmlab", (3, 12, 12), 4, other_obs_shape=(3, 24, 24)),
}
BY_MODULE = {s.module: s for s in SCRIPTS.values()}
A2C = ("atari", "procgen", "minigrid")
PIXEL_A2C = ("atari", "procgen")  # a convolutional stem: --init-stem-from, --freeze-stem, --stem-in-update
TRAINING = tuple(SCRIPTS)  # the progress line


def only(*names):
    """The claim holds for these scripts (the `script` fixture's other values do not apply)."""
    return pytest.mark.parametrize("script", names, indirect=True)


@pytest.fixture(scope="module", params=SCRIPTS)
def script(request):
    """The script's module; imported here, so that a script that does not import fails its own cases only."""
    return importlib.import_module(SCRIPTS[request.param].module)


@pytest.fixture
def known(script):
    """What the claims need to know of the script (its row in SCRIPTS)."""
    return BY_MODULE[script.__name__]


# ---------------------------------------------------------------------------------------------
# The eLSTM: one text, Method §1's forward, exact RTRL (Method §2, §3)
# ---------------------------------------------------------------------------------------------
def class_source(path, name="ELSTM"):
    with open(path) as f:
        text = f.read()
    (node,) = [n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == name]
    return ast.get_source_segment(text, node)


@only("procgen", "minigrid", "impala")
def test_every_script_has_the_same_elstm_text(script):
    """The scripts copy the eLSTM on purpose (each stands alone); the copies must stay one text, the Atari one's."""
    atari = importlib.import_module(SCRIPTS["atari"].module)
    assert class_source(script.__file__) == class_source(atari.__file__), f"{script.__name__}'s ELSTM differs"


def test_forward_matches_spec_equations(script):
    checks.check_forward_matches_spec(script)


@pytest.mark.parametrize("chunk_len", [7, 1])
@pytest.mark.parametrize("impl", ["chunked", "step"])
def test_rtrl_equals_bptt_across_chunks_with_resets(script, impl, chunk_len):
    checks.check_rtrl_equals_bptt_across_chunks(script, impl, chunk_len)


def test_carried_sensitivities_are_dc_dtheta_for_both_impls(script):
    checks.check_carried_sensitivities_are_dc_dtheta(script)


@pytest.mark.parametrize("impl", ["chunked", "step"])
def test_rtrl_scan_input_gradient_equals_autograd(script, impl):
    checks.check_rtrl_scan_input_gradient_equals_autograd(script, impl)


@long_runs.CUDA
@pytest.mark.parametrize("impl", ["chunked", "step"])
def test_rtrl_equals_bptt_on_cuda(script, impl):
    checks.check_rtrl_equals_bptt_on_cuda(script, impl)
