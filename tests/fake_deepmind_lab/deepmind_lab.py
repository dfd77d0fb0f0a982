"""A stand-in for DeepMind Lab's Python module `deepmind_lab`, which cannot be built here.

It keeps the real API's names, signatures, types and failure modes that rtrl_impala_dmlab.py relies on, as
google-deepmind/lab's python/dmlab_module.c has them: Lab(level, observations, config, renderer, level_cache)
with a list of observations and a dict of str settings; reset(episode, seed) with a Python int seed (a numpy
integer raises ValueError, as PyLong_Check fails); step(action, num_steps) with a numpy array (anything else
raises TypeError) of shape (7,) and dtype intc (else ValueError), values not range-checked, the frames'
rewards summed; num_steps() counting the frames requested since reset(); is_running(), observations(),
action_spec(), observation_spec(), fps(), close(). Hold-out levels (the `_test` variants) need the setting
allowHoldOutLevels "true", and the levels that load the Brady, Konkle & Oliva (2008) images a datasetPath.

The world is a toy with a known answer: an episode lasts EPISODE_FRAMES frames; each frame of the exact
Forward action vector (MOVE_BACK_FORWARD 1, nothing else) earns 1, so a swapped action mapping shows in the
return; the image's red channel is the episode seed mod 256, green the frame count mod 256, blue the last
look-left/right value + 128. Every step's action vector, every reset's seed and the settings are kept on the
instance, so tests can check what the adapter sent.

For the hung-actor test: with FAKE_DMLAB_HANG_TRIGGER=path set, the first step() in any process after that
file appears removes it and then sleeps forever (a stuck environment).
"""

import os
import time

import numpy as np

EPISODE_FRAMES = 30
LEVELS = (
    "rooms_watermaze",
    "rooms_keys_doors_puzzle",
    "rooms_select_nonmatching_object",
    "explore_goal_locations_small",
    "lasertag_one_opponent_small",
    "rooms_collect_good_objects_train",
    "rooms_collect_good_objects_test",
    "rooms_exploit_deferred_effects_train",
    "rooms_exploit_deferred_effects_test",
    "psychlab_continuous_recognition",
    "psychlab_visual_search",
    "psychlab_arbitrary_visuomotor_mapping",
)  # some of DMLab-30 and the held-out variants
HOLD_OUT = ("rooms_collect_good_objects_test", "rooms_exploit_deferred_effects_test")
NEEDS_DATASET = ("psychlab_continuous_recognition", "psychlab_arbitrary_visuomotor_mapping")
_ACTIONS = (  # DMLab's order
    ("LOOK_LEFT_RIGHT_PIXELS_PER_FRAME", -512, 512),
    ("LOOK_DOWN_UP_PIXELS_PER_FRAME", -512, 512),
    ("STRAFE_LEFT_RIGHT", -1, 1),
    ("MOVE_BACK_FORWARD", -1, 1),
    ("FIRE", 0, 1),
    ("JUMP", 0, 1),
    ("CROUCH", 0, 1),
)
_FORWARD = np.array([0, 0, 0, 1, 0, 0, 0], dtype=np.intc)


class Lab:
    def __init__(self, level, observations, config=None, renderer="software", level_cache=None):
        if not isinstance(level, str):
            raise TypeError("level must be str")
        if not isinstance(observations, list) or (config is not None and not isinstance(config, dict)):
            raise TypeError("observations must be a list and config a dict")
        config = dict(config or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
            raise TypeError("bad argument type for built-in operation")  # PyUnicode_AsUTF8 on a non-str
        name = level.split("/")[-1]
        if name not in LEVELS or not level.startswith("contributed/dmlab30/"):
            raise RuntimeError(f"Invalid levelName flag '{level}' - \"Failed to find level script\"")
        if name in HOLD_OUT and config.get("allowHoldOutLevels") != "true":
            raise RuntimeError(f'Failed to init environment - "{name} is a hold-out level: allowHoldOutLevels"')
        if name in NEEDS_DATASET and not config.get("datasetPath"):
            raise RuntimeError(
                'Failed to init environment - "Follow instructions to download datasets here: '
                'data/brady_konkle_oliva2008/README.md"'
            )
        if observations != ["RGB_INTERLEAVED"]:
            raise ValueError(f"unsupported observations {observations!r} in this fake")
        if renderer not in ("software", "hardware"):
            raise RuntimeError(f'Failed to set renderer must be "hardware" or "software" actual "{renderer}"!')
        self.height, self.width = int(config.get("height", 240)), int(config.get("width", 320))
        self.level, self.config, self.seeds, self.actions = level, config, [], []
        self._frame, self._num_steps, self._running, self._look, self._closed = 0, 0, False, 0, False

    def action_spec(self):
        return [{"name": name, "min": low, "max": high} for name, low, high in _ACTIONS]

    def observation_spec(self):
        return [{"name": "RGB_INTERLEAVED", "dtype": np.uint8, "shape": (self.height, self.width, 3)}]

    def fps(self):
        return 60

    def reset(self, episode=-1, seed=None):
        self._check_open()
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"'seed' must be int or None, was '{type(seed).__name__}'.")
        self.seeds.append(seed)
        self._frame, self._num_steps, self._running, self._look = 0, 0, True, 0
        return True

    def is_running(self):
        return self._running

    def num_steps(self):
        return self._num_steps

    def observations(self):
        if not self._running:
            raise RuntimeError("Environment in wrong status for call to observations()")
        obs = np.empty((self.height, self.width, 3), dtype=np.uint8)
        obs[..., 0] = (self.seeds[-1] or 0) % 256
        obs[..., 1] = self._frame % 256
        obs[..., 2] = self._look + 128
        return {"RGB_INTERLEAVED": obs}

    def step(self, action, num_steps=1):
        if not isinstance(action, np.ndarray):
            raise TypeError(f"step() argument 1 must be numpy.ndarray, not {type(action).__name__}")
        if not self._running:
            raise RuntimeError("Environment in wrong status to advance.")
        if action.shape != (len(_ACTIONS),):
            raise ValueError(f"action must have shape ({len(_ACTIONS)})")
        if action.dtype != np.intc:
            raise ValueError("action must have dtype np.intc")
        _hang_if_triggered()
        self.actions.append(action.copy())
        self._look = int(action[0])
        self._num_steps += num_steps  # what was asked for, as dmlab_module.c counts, even past the episode's end
        reward = 0.0
        for _ in range(num_steps):  # DMLab repeats the action and sums the rewards, stopping at the episode's end
            reward += float(np.array_equal(action, _FORWARD))
            self._frame += 1
            if self._frame >= EPISODE_FRAMES:
                self._running = False
                break
        return reward

    def close(self):
        self._closed = True
        return True

    def _check_open(self):
        if self._closed:
            raise RuntimeError("Environment is closed")


def _hang_if_triggered():
    trigger = os.environ.get("FAKE_DMLAB_HANG_TRIGGER")
    if trigger is None:
        return
    try:
        os.remove(trigger)  # atomic: one step() in one process wins
    except FileNotFoundError:
        return
    while True:
        time.sleep(3600)
