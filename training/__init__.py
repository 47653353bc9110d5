"""The training algorithms, with no Django: the Bradley-Terry reward model (`reward`), PPO (`ppo`),
the packaged offline backbones (`backbones`), the command-line helpers (`cli`) and the reward-hacking
rule (`hacking`). A GPU box runs them from an exported file with `python -m training.reward` or
`python -m training.ppo`; the `rounds` app is the Django shell that calls them."""
