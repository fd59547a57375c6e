"""LIBERO on CPU: suites and envs, the upstream OpenVLA evaluation protocol, scripted episodes, replay.

Modules (import them directly; importing this package does not import the simulator):
    env       suites, tasks, init states, env construction (`make_env`), errors listing valid names
    protocol  image pipeline (rotate, JPEG, lanczos, center crop), gripper post-processing, constants,
              the 8-dim robot state and action chunks for pi0 / pi0.5
    oracle    scripted pick-and-place controller reading object poses from the simulator
    episodes  recorded episodes (save/load) and open-loop `replay` of a policy over their frames
    evaluate  closed-loop trials and the resumable per-(method, suite, task) results files
"""

from .env import SUITES

__all__ = ["SUITES"]
