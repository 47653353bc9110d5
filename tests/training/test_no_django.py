"""training/ and judging/ are the Django-free cores: a GPU box runs them from an exported file with
no Django installed. Every module of both packages must import with Django absent."""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import judging
import training

ROOT = Path(__file__).resolve().parents[2]


def test_every_training_and_judging_module_imports_without_django():
    modules = sorted(
        f"{package.__name__}.{info.name}"
        for package in (training, judging)
        for info in pkgutil.walk_packages(package.__path__)
    )
    expected = {
        "training.reward",
        "training.ppo",
        "training.grpo",
        "training.dpo",
        "training.evaluation",
        "judging.judges",
    }
    assert expected <= set(modules)
    # A fresh interpreter, as this one has Django loaded: a None entry in sys.modules makes any
    # `import django` (and `import django.anything`) raise ImportError.
    script = (
        "import importlib, json, sys\n"
        "sys.modules['django'] = None\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = [name for name, module in sys.modules.items() if name.split('.')[0] == 'django' and module]\n"
        "print(json.dumps(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_the_guard_catches_a_module_that_imports_django(tmp_path):
    """The same script fails on a module that needs Django, so the test above can fail."""
    (tmp_path / "needs_django.py").write_text("from django.conf import settings\n")
    script = "import sys\nsys.modules['django'] = None\nimport needs_django\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "'django' is not a package" in done.stderr
