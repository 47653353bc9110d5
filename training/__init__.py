"""Training core: reward models and PPO on torch + transformers + peft. Imports no Django."""
