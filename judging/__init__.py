"""AI labelers: language models that judge pairs under a written constitution (RLAIF). No Django, so
the labeling command, a benchmark or a GPU box can use it alike."""
