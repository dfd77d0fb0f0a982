"""The claims every script (or every script of a kind) must meet, each written once and reported per script:
`test_rtrl_equals_bptt_across_chunks_with_resets[atari-chunked-7]`. The checks live in tests/claims.py and
tests/long_runs.py; what differs between the scripts is in the tables below. Each script's own file keeps what
only it has (its environments, its bad input, its runs as a user starts them)."""

import ast
import dataclasses
import importlib
import os
from dataclasses import dataclass

import claims as checks
import helpers
import long_runs
import pytest
import torch


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
    "bsuite": Script("rtrl_a2c_bsuite", checks.Vector.shape, 2, obs_kind=checks.Vector),
    "popgym": Script("rtrl_a2c_popgym", checks.Vector.shape, 4, obs_kind=checks.Vector),
}
NAMES = {s.module: name for name, s in SCRIPTS.items()}
A2C = ("atari", "procgen", "minigrid", "bsuite", "popgym")
POPULATIONS = ("bsuite", "popgym")  # --num-seeds
CHECKPOINTS = ("atari", "procgen", "minigrid")  # save_checkpoint, resume and the progress line's clock (impala: its own file)
PIXEL_A2C = ("atari", "procgen")  # a convolutional stem: --init-stem-from, --freeze-stem


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
    return SCRIPTS[NAMES[script.__name__]]


# ---------------------------------------------------------------------------------------------
# The eLSTM: one text, Method §1's forward, exact RTRL (Method §2, §3)
# ---------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ELSTM_COPIES = {**{name: s.module for name, s in SCRIPTS.items()}, "multilayer": "rtrl_multilayer_study"}


def class_source(module, name="ELSTM"):
    """The text of the script's `class ELSTM`, read from its file (not imported)."""
    with open(os.path.join(ROOT, f"{module}.py")) as f:
        text = f.read()
    (node,) = [n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == name]
    return ast.get_source_segment(text, node)


@pytest.mark.parametrize("copy", [name for name in ELSTM_COPIES if name != "atari"])
def test_every_script_has_the_same_elstm_text(copy):
    """The scripts copy the eLSTM on purpose (each stands alone); the copies must stay one text, the Atari one's."""
    assert class_source(ELSTM_COPIES[copy]) == class_source(ELSTM_COPIES["atari"]), f"{copy}'s ELSTM differs"


@pytest.mark.parametrize("copy", ELSTM_COPIES)
def test_every_script_has_one_main_block(copy):
    """The main work under one `if __name__ == "__main__":`, the module's last statement (a second would run again)."""
    with open(os.path.join(ROOT, f"{ELSTM_COPIES[copy]}.py")) as f:
        body = ast.parse(f.read()).body
    mains = [i for i, n in enumerate(body) if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'"]
    assert mains == [len(body) - 1], f"{copy}: main blocks at statements {mains} of {len(body)}"


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


# ---------------------------------------------------------------------------------------------
# The A2C update (Method §5, §6)
# ---------------------------------------------------------------------------------------------
@only(*A2C)
def test_returns_bootstrap_truncations_and_cut_terminations(script):
    checks.check_returns_bootstrap_truncations_and_cut_terminations(script)


@only(*A2C)
@pytest.mark.parametrize(
    "core,impl", [("rtrl", "chunked"), ("rtrl", "step"), ("tbptt", "chunked"), ("lstm", "chunked"), ("ff", "chunked")]
)
def test_update_gradients_equal_autograd_on_equivalent_computation(script, known, core, impl):
    if impl == "step" and not hasattr(script.Args, "rtrl_impl"):
        pytest.skip("one RTRL path in the update (ELSTM.rtrl's impl='step' is checked above)")
    checks.check_update_gradients_equal_autograd(script, core, impl, obs_kind=known.obs_kind)


# ---------------------------------------------------------------------------------------------
# Populations (--num-seeds K): K agents in one process, each its single run
# ---------------------------------------------------------------------------------------------
POPULATION_STEMS = [("bsuite", {"stem": "none"}), ("bsuite", {"stem": "mlp"}), ("popgym", {})]


@pytest.mark.parametrize("core", ["rtrl", "tbptt", "lstm", "ff"])
@pytest.mark.parametrize("name,flags", POPULATION_STEMS, ids=["bsuite-none", "bsuite-mlp", "popgym"])
def test_one_update_of_a_population_equals_its_agents_single_updates(name, flags, core):
    script = importlib.import_module(SCRIPTS[name].module)
    checks.check_one_update_of_a_population_equals_its_agents_single_updates(script, core, **flags)


@only(*POPULATIONS)
def test_an_agents_gradients_do_not_depend_on_the_other_agents_parameters(script):
    flags = {"stem": "mlp"} if script.__name__ == "rtrl_a2c_bsuite" else {}
    checks.check_an_agents_gradients_do_not_depend_on_the_other_agents_parameters(script, **flags)


@only(*PIXEL_A2C)
@pytest.mark.parametrize("core,impl", [("rtrl", "chunked"), ("rtrl", "step"), ("tbptt", "chunked"), ("lstm", "chunked")])
def test_frozen_stem_gets_no_gradient_nor_backward_pass_and_the_rest_equals_autograd(script, core, impl):
    if impl == "step" and not hasattr(script.Args, "rtrl_impl"):
        pytest.skip("one RTRL path in the update (ELSTM.rtrl's impl='step' is checked above)")
    checks.check_frozen_stem_gets_nothing_and_the_rest_is_exact(script, core, impl)


@only(*A2C)
@pytest.mark.parametrize(
    "name,value",
    [("learning_rate", -1e-3), ("learning_rate", 0.0), ("max_grad_norm", 0.0), ("rms_eps", -0.01)]
    + [("rms_alpha", 1.5), ("gamma", -0.5), ("gamma", 1.01), ("gamma", float("nan"))],
)
def test_an_optimiser_or_return_flag_out_of_range_is_a_one_line_error(script, name, value, capsys):
    """torch's own check is a traceback (a negative learning rate) or nothing (alpha or gamma over 1)."""
    script.check_args(script.Args())  # the defaults pass
    args = dataclasses.replace(script.Args(), **{name: value})
    helpers.bad_input_in_process(lambda _: script.check_args(args), [], f"--{name.replace('_', '-')}", capsys)


# ---------------------------------------------------------------------------------------------
# Evaluation, a stem from a checkpoint, devices, checkpoints
# ---------------------------------------------------------------------------------------------
@only("atari", "procgen", "impala")
def test_greedy_evaluation_plays_a_fixed_quota_per_env(script):
    checks.check_greedy_evaluation_plays_a_fixed_quota_per_env(script)


# the A2C scripts say what torch.load or load_state_dict found wrong; another script's stem of the same shapes fits
INIT_STEM_ERRORS = {
    "missing.pt": "No such file or directory",
    ".": "Is a directory",  # a run directory given for its model.pt
    "text.pt": "Weights only load failed",
    "list.pt": "list indices must be integers",
    "mlp.pt": 'Missing key(s) in state_dict: "0.0.0.weight"',
    "shape.pt": "size mismatch for 0.0.0.weight",
}


@only("atari", "procgen", "impala")
def test_init_stem_from_copies_the_stem_and_refuses_what_does_not_fit(script, known, tmp_path, capsys):
    errors = INIT_STEM_ERRORS if NAMES[script.__name__] in PIXEL_A2C else checks.INIT_STEM_ERRORS
    checks.check_init_stem_from(script, tmp_path, capsys, known.obs_shape, known.other_obs_shape, errors)


def test_the_device_line_names_the_device(script, monkeypatch):
    long_runs.check_the_device_line_names_the_device(script, monkeypatch)


@only(*CHECKPOINTS)
def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(script, known, tmp_path, monkeypatch):
    long_runs.check_a_checkpoint_from_a_gpu_loads_on_the_cpu(script, known.obs_shape, known.num_actions, tmp_path, monkeypatch)


@only(*CHECKPOINTS)
def test_a_checkpoint_holds_cpu_copies_of_every_tensor_and_loads_with_map_location_cpu(script, known, tmp_path, monkeypatch):
    make_agent = lambda: script.Agent(known.obs_shape, known.num_actions, checks.HIDDEN)
    checks.check_checkpoint_holds_cpu_copies(script, make_agent, tmp_path, monkeypatch)


# ---------------------------------------------------------------------------------------------
# The progress line: elapsed time and an ETA
# ---------------------------------------------------------------------------------------------
@only(*CHECKPOINTS, *POPULATIONS)
def test_progress_gives_the_elapsed_time_and_an_eta_at_the_steps_per_second_so_far(script):
    """12 s, 4m09s, 10h31m; the ETA is the steps left at the steps/s so far: 249 s for 1,000 steps, 9,000 to go."""
    assert script.progress(12.4, 100, 0) == "elapsed=12s eta=0s"
    assert script.progress(249, 1_000, 9_000) == "elapsed=4m09s eta=37m21s"
    assert script.progress(3599.6, 1, 10.52) == "elapsed=1h00m eta=10h31m"


# ---------------------------------------------------------------------------------------------
# Long runs of the A2C scripts: --checkpoint-every, --resume, Ctrl-C / SIGTERM (tests/long_runs.py)
# ---------------------------------------------------------------------------------------------
RESUMABLE = ("--num-envs", "2", "--num-steps", "8", "--hidden-size", "16", "--eval-episodes", "0", "--checkpoint-every", "16")
SAVED_STEP = 48  # 3 updates of 2 envs x 8 steps; checkpoints at 16, 32, 48 (the end)


@dataclass(frozen=True)
class LongRun:
    flags: tuple  # besides RESUMABLE
    resume_to: int  # a resumed run's --total-timesteps: long enough for episodes to end after the resume
    evals: dict  # eval tag -> the steps the resumed run logs it at
    eval_lines: tuple = ()  # what the resumed run's last evaluation prints
    cuda_flags: tuple = ()  # besides the two updates' flags, for a run on a GPU
    agent: tuple = ()  # (observation shape, actions) of the env, if not the script's row in SCRIPTS


LONG_RUNS = {
    "atari": LongRun((), 640, {"eval/episodic_return": [0]}),  # logged by episode, as CleanRL
    # 136 steps per env after the resume: Chaser's episodes end; evaluations at 160 (a multiple of --eval-every) and at
    # the end
    "procgen": LongRun(
        ("--eval-every", "160"),
        320,
        {"eval/train_levels_return": [160, 320], "eval/test_levels_return": [160, 320]},
        eval_lines=("global_step=320 greedy eval", "test (all)", "[1400, 1600)"),  # the default test level sets
        cuda_flags=("--test-level-starts", "3000"),
    ),
    # masked CartPole (positions only): short episodes, so some end after the resume; a run name of one's own
    "minigrid": LongRun(("--env-id", "CartPole-v1", "--run-name", "a"), 160, {"eval/episodic_return": [0]}, agent=((2,), 2)),
}


@pytest.fixture(scope="module")
def checkpointed(script, tmp_path_factory):
    """One short run with checkpoints per script, shared by the claims below (see long_runs.first_run)."""
    flags = (*RESUMABLE, *LONG_RUNS[NAMES[script.__name__]].flags)
    return long_runs.first_run(script, tmp_path_factory.mktemp("checkpointed"), flags, SAVED_STEP)


@pytest.fixture
def long_run(script):
    return LONG_RUNS[NAMES[script.__name__]]


@pytest.fixture
def agent_shape(known, long_run):
    """(observation shape, actions) of the long runs' env."""
    return long_run.agent or (known.obs_shape, known.num_actions)


@only(*LONG_RUNS)
def test_resume_takes_the_checkpoints_args_and_the_flags_given_win(script, agent_shape, checkpointed):
    long_runs.check_resume_takes_the_checkpoints_args_and_the_flags_given(script, checkpointed, agent_shape)


@only(*LONG_RUNS)
def test_resume_with_more_total_timesteps_extends_the_run_from_its_step(
    script, agent_shape, long_run, checkpointed, monkeypatch, capsys
):
    more = ["--eval-episodes", "1", "--save-model"]  # the smoke runs' evaluations, and model.pt
    scalars, out = long_runs.check_resumed_run_goes_on_from_its_step(
        script, checkpointed, long_run.resume_to, more, monkeypatch, capsys
    )
    for tag, steps in long_run.evals.items():
        assert [step for step, _ in scalars[tag]] == steps, tag
    assert all(text in out for text in long_run.eval_lines), out
    model = torch.load(checkpointed.dir / "runs" / checkpointed.name / "model.pt", weights_only=True)
    agent = script.Agent(*agent_shape, 16, "rtrl")
    agent.load_state_dict(model["model"])
    assert model["script"] == os.path.basename(script.__file__) and model.keys() == {"script", "model", "args"}


@only(*LONG_RUNS)
def test_the_same_seed_logs_identical_losses(script, checkpointed, tmp_path, monkeypatch):
    long_runs.check_same_seed_logs_identical_losses(script, checkpointed, tmp_path, monkeypatch)


@only(*LONG_RUNS)
def test_ctrl_c_finishes_the_update_writes_a_checkpoint_and_exits_130(script, checkpointed, tmp_path):
    long_runs.check_ctrl_c_writes_a_checkpoint_and_exits_130(script, checkpointed, tmp_path)


@only(*LONG_RUNS)
def test_sigterm_checkpoints_and_resume_alone_finishes_the_run_deterministically(
    script, checkpointed, tmp_path, monkeypatch, capsys
):
    run_dir = long_runs.check_sigterm_finishes_the_update_and_exits_143(script, checkpointed, tmp_path, monkeypatch, capsys)
    long_runs.check_resume_alone_finishes_the_run_deterministically(script, run_dir, checkpointed.batch, monkeypatch)


@only(*LONG_RUNS)
def test_a_bad_checkpoint_to_resume_is_a_one_line_error(script, agent_shape, checkpointed, tmp_path, capsys):
    cases = [
        (None, ["--resume", "missing.pt"], "--resume missing.pt: [Errno 2] No such file or directory"),
        ("truncate", [], "failed finding central directory"),  # torch.load's own words
        ("weights only", [], "a model.pt holds the weights only"),
        ("another script's args", [], "unexpected keyword argument 'not_a_flag_here'"),
        (
            None,
            ["--hidden-size", "64"],
            "the checkpoint does not fit: Error(s) in loading state_dict for Agent: size mismatch",
        ),
        ("other shapes", [], "the checkpoint does not fit: Error(s) in loading state_dict for Agent: size mismatch"),
    ]
    long_runs.check_bad_checkpoints_are_one_line_errors(script, checkpointed, tmp_path, capsys, *agent_shape, cases)


@only(*PIXEL_A2C)
def test_a_checkpoint_serves_as_init_stem_from(script, known, checkpointed):
    long_runs.check_a_checkpoint_gives_its_stem(script, checkpointed, known.obs_shape, known.num_actions)


@only(*LONG_RUNS)
def test_the_script_checks_the_checkpoint_before_it_writes(script, checkpointed):
    long_runs.check_main_checks_the_checkpoint_before_it_writes(script, checkpointed)


@long_runs.CUDA
@only(*LONG_RUNS)
def test_two_updates_on_cuda(script, long_run, tmp_path):
    flags = ("--num-envs", "2", "--num-steps", "8", "--total-timesteps", "32", "--hidden-size", "16", "--eval-episodes", "1")
    long_runs.check_two_updates_on_cuda(script, tmp_path, (*flags, *long_run.cuda_flags))
