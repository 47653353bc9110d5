"""Load benchmarks; run them as scripts (`python bench/labeling_load.py`)."""
