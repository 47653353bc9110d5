"""Training: reward models (and, next, PPO).

The core modules (`reward`, `backbones`) import no Django: a GPU box runs them from an exported
file with `python -m training.reward`. `models`, `services` and `tasks` are the thin Django shell
that versions runs, leases them to one worker at a time and records their progress and metrics.
"""
