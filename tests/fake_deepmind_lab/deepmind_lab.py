"""A stand-in for DeepMind Lab's Python module `deepmind_lab`, which cannot be built here.

It keeps the real API's names, signatures, types and failure modes that rtrl_impala_dmlab.py relies on
(google-deepmind/lab, docs/users/python_api.md): Lab(level, observations, config, renderer), reset(episode,
seed), observations(), step(action, num_steps) summing the frames' rewards, is_running(), num_steps(),
action_spec(), observation_spec(), fps(), close(). The world is a toy with a known answer: an episode lasts
EPISODE_FRAMES frames; each frame that moves forward earns 1; the image's red channel is the episode seed
mod 256, green the frame count mod 256, blue the last look-left/right value + 128. Every step's action
vector and every reset's seed are logged on the instance, so tests can check what the adapter sent.
"""

import numpy as np

EPISODE_FRAMES = 30
LEVELS = ("rooms_watermaze", "rooms_keys_doors_puzzle", "rooms_select_nonmatching_object",
          "explore_goal_locations_small", "lasertag_one_opponent_small")  # a few of DMLab-30
_ACTIONS = (  # DMLab's order
    ("LOOK_LEFT_RIGHT_PIXELS_PER_FRAME", -512, 512), ("LOOK_DOWN_UP_PIXELS_PER_FRAME", -512, 512),
    ("STRAFE_LEFT_RIGHT", -1, 1), ("MOVE_BACK_FORWARD", -1, 1), ("FIRE", 0, 1), ("JUMP", 0, 1), ("CROUCH", 0, 1),
)


class Lab:
    def __init__(self, level, observations, config=None, renderer="software", level_cache=None):
        if level.split("/")[-1] not in LEVELS or not level.startswith("contributed/dmlab30/"):
            raise RuntimeError(f"Failed to find level script {level!r}")
        config = dict(config or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
            raise TypeError("config keys and values must be strings")
        if list(observations) != ["RGB_INTERLEAVED"]:
            raise ValueError(f"unsupported observations {observations!r} in this fake")
        self.height, self.width = int(config.get("height", 240)), int(config.get("width", 320))
        self.level, self.seeds, self.actions = level, [], []
        self._frame, self._running, self._look, self._closed = 0, False, 0, False

    def action_spec(self):
        return [{"name": name, "min": low, "max": high} for name, low, high in _ACTIONS]

    def observation_spec(self):
        return [{"name": "RGB_INTERLEAVED", "dtype": np.uint8, "shape": (self.height, self.width, 3)}]

    def fps(self):
        return 60

    def reset(self, episode=-1, seed=None):
        self._check_open()
        self.seeds.append(seed)
        self._frame, self._running, self._look = 0, True, 0
        return True

    def is_running(self):
        return self._running

    def num_steps(self):
        return self._frame

    def observations(self):
        if not self._running:
            raise RuntimeError("Environment in wrong status for call to observations()")
        obs = np.empty((self.height, self.width, 3), dtype=np.uint8)
        obs[..., 0] = (self.seeds[-1] or 0) % 256
        obs[..., 1] = self._frame % 256
        obs[..., 2] = self._look + 128
        return {"RGB_INTERLEAVED": obs}

    def step(self, action, num_steps=1):
        if not self._running:
            raise RuntimeError("Environment in wrong status for call to step()")
        if not isinstance(action, np.ndarray) or action.dtype != np.intc or action.shape != (len(_ACTIONS),):
            raise ValueError("action must be a numpy array of dtype intc and shape (7,)")
        for value, (name, low, high) in zip(action, _ACTIONS):
            if not low <= value <= high:
                raise ValueError(f"{name} out of range: {value}")
        self.actions.append(action.copy())
        self._look = int(action[0])
        reward = 0.0
        for _ in range(num_steps):  # DMLab repeats the action and sums the rewards, stopping at the episode's end
            reward += float(action[3] == 1)
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
