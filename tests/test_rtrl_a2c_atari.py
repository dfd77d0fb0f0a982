"""Claims about rtrl_a2c_atari.py, each checked against an independent float64 computation (tests/claims.py)."""

import glob
import os

import pytest
import torch
import tyro

import claims as checks
import helpers
import rtrl_a2c_atari as atari

SCRIPT = atari.__file__


def test_forward_matches_spec_equations():
    checks.check_forward_matches_spec(atari)


@pytest.mark.parametrize("impl", ["chunked", "step"])
@pytest.mark.parametrize("chunk_len", [7, 1])
def test_rtrl_equals_bptt_across_chunks_with_resets(impl, chunk_len):
    checks.check_rtrl_equals_bptt_across_chunks(atari, impl, chunk_len)


def test_carried_sensitivities_are_dc_dtheta_for_both_impls():
    checks.check_carried_sensitivities_are_dc_dtheta(atari)


@pytest.mark.parametrize("impl", ["chunked", "step"])
def test_rtrl_scan_input_gradient_equals_autograd(impl):
    checks.check_rtrl_scan_input_gradient_equals_autograd(atari, impl)


def test_returns_bootstrap_truncations_and_cut_terminations():
    checks.check_returns_bootstrap_truncations_and_cut_terminations(atari)


@pytest.mark.parametrize(
    "core,impl", [("rtrl", "chunked"), ("rtrl", "step"), ("tbptt", "chunked"), ("lstm", "chunked"), ("ff", "chunked")]
)
def test_update_gradients_equal_autograd_on_equivalent_computation(core, impl):
    checks.check_update_gradients_equal_autograd(atari, core, impl)


FROZEN_CORES = [("rtrl", "chunked"), ("rtrl", "step"), ("tbptt", "chunked"), ("lstm", "chunked")]


@pytest.mark.parametrize("core,impl", FROZEN_CORES)
def test_frozen_stem_gets_no_gradient_nor_backward_pass_and_the_rest_equals_autograd(core, impl):
    checks.check_frozen_stem_gets_nothing_and_the_rest_is_exact(atari, core, impl)


def test_init_stem_from_copies_the_stem_and_refuses_what_does_not_fit(tmp_path, capsys):
    checks.check_init_stem_from(atari, tmp_path, capsys, (4, 84, 84), (3, 64, 64))


def test_greedy_evaluation_plays_a_fixed_quota_per_env():
    checks.check_greedy_evaluation_plays_a_fixed_quota_per_env(atari)


# ---------------------------------------------------------------------------------------------
# The script as a user runs it
# ---------------------------------------------------------------------------------------------
def run_script(tmp_path, *flags):
    return helpers.run_script(SCRIPT, tmp_path, *flags)


# tbptt runs the update code ff runs (the eLSTM by autograd, another reset mask): lstm takes its smoke run;
# the fully online run also loads a pretrained stem and freezes it. Only the rtrl run is long enough for games to
# end (320 steps per env); the others show that their core's loop runs and writes what it should.
@pytest.mark.parametrize(
    "core,num_steps,updates,frozen", [("rtrl", 8, 40, False), ("lstm", 8, 3, False), ("ff", 8, 3, False),
                                      ("rtrl", 1, 8, True)]
)  # fmt: skip
def test_training_run_writes_scalars_and_a_loadable_checkpoint(tmp_path, core, num_steps, updates, frozen):
    steps = 2 * num_steps * updates
    torch.manual_seed(0)
    pretrained = atari.Agent((4, 84, 84), 4, 8, "tbptt")
    atari.save_checkpoint(pretrained, atari.Args(core="tbptt"), str(tmp_path / "pretrained.pt"))
    stem_flags = ["--init-stem-from", "pretrained.pt", "--freeze-stem"] if frozen else []
    proc = run_script(tmp_path, "--core", core, "--num-envs", "2", "--num-steps", str(num_steps),
                      "--total-timesteps", str(steps), "--hidden-size", "16", "--eval-episodes", "1", "--save-model",
                      *stem_flags)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / f"Breakout-v5__rtrl_a2c_atari__{core}__T{num_steps}__1__*"))
    scalars = checks.read_scalars(run_dir)
    checks.check_update_scalars(scalars, iterations=updates)
    if updates == 40:
        assert len(scalars["charts/episodic_return"]) >= 1  # seeded run: real games do end
        assert all(length > 0 for length in scalars["charts/episodic_length"])
    assert len(scalars["eval/episodic_return"]) == 1

    checkpoint = torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)
    assert checkpoint["args"]["core"] == core and not glob.glob(os.path.join(run_dir, "*.tmp"))
    agent = atari.Agent((4, 84, 84), 4, checkpoint["args"]["hidden_size"], core)
    agent.load_state_dict(checkpoint["model"])
    assert checkpoint["script"] == "rtrl_a2c_atari.py" and checkpoint["args"]["freeze_stem"] == frozen
    trained_stem = agent.stem.state_dict()
    stem_kept = [torch.equal(trained_stem[k], v) for k, v in pretrained.stem.state_dict().items()]
    assert all(stem_kept) if frozen else not any(stem_kept)  # loaded and left alone, or trained from its own start


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--env-id", "Breakot-v5"], "Breakout-v5"),
        (["--num-envs", "0"], "--num-envs must be at least 1"),
        (["--num-steps", "0"], "--num-steps must be at least 1"),
        (["--total-timesteps", "10", "--num-envs", "4", "--num-steps", "5"], "less than one rollout"),
        (["--learning-rate", "-1"], "--learning-rate must be in"),
        (["--gamma", "1.5"], "--gamma must be in"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be positive"),
        (["--init-stem-from", "missing.pt"], "--init-stem-from missing.pt: no such file"),
    ],
)
def test_bad_input_is_a_one_line_error(flags, message, capsys):
    helpers.bad_input_in_process(lambda argv: atari.check_args(tyro.cli(atari.Args, args=argv)), flags, message,
                                 capsys)  # fmt: skip


def test_the_script_checks_its_input_before_it_starts(tmp_path):
    proc = run_script(tmp_path, "--init-stem-from", "missing.pt")
    checks.check_bad_input_is_a_one_line_error(proc, "--init-stem-from missing.pt: no such file", tmp_path)
