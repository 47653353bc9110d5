import json
import random
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler, get_internal_wsgi_application
from django.db import transaction
from django.db.models import F, Sum

from annotation import simulation
from annotation.models import Comparison, Project
from annotation.services import (
    ImportRejected,
    agreement_refresh,
    bot_token,
    labeler_create,
    pairs_import_file,
    project_update,
)
from training.cli import progress_bar

DEMO_FILE = Path(__file__).resolve().parents[2] / "demo_data.jsonl"
DEMO_GUIDELINES = """\
Compare the two answers to the **last user message**.

1. **Correct** beats fluent: a confident factual error is worse than a hedge.
2. **Helpful**: does it answer what was asked, at a useful level of detail?
3. **Clear**: well organised, no padding.

Choose *tie* when both are equally good, *both bad* when neither is acceptable.
Strength says how sure you are: slightly, clearly or much better.
"""
DEMO_LABELERS = ["alice", "bob", "carol"]
SIMULATED = 3  # bots sim-demo-0..2: with the demo's overlap of 3 they label every pair once each
# A round sized for a laptop CPU: the packaged SmolLM2-135M-Instruct as the first policy, the
# packaged MiniLM encoder as the reward backbone, short answers and a few optimizer steps.
DEMO_TRAINING = {
    "min_new_comparisons": 60,
    "held_out_prompts": 8,
    "policy": "smollm2-135m",
    "reward_overrides": {"backbone": "minilm-l6"},
    "optimizer_overrides": {
        "max_new_tokens": 32, "max_prompt_length": 128, "reward_max_length": 256,
        "ppo": {"steps": 4, "batch_size": 8, "minibatches": 2, "ppo_epochs": 2, "learning_rate": 1e-5,
                "checkpoint_every": 2},
        "grpo": {"steps": 4, "batch_size": 2, "group_size": 4, "learning_rate": 1e-5, "checkpoint_every": 2},
        "rloo": {"steps": 4, "batch_size": 2, "group_size": 4, "learning_rate": 1e-5, "checkpoint_every": 2},
        **{name: {"epochs": 1, "batch_size": 8, "max_length": 256, "learning_rate": 5e-6}
           for name in ("dpo", "ipo", "kto")},
    },
}  # fmt: skip


class Command(BaseCommand):
    help = (
        "Create demo users (printed with their passwords) and the small benign 'demo' project, with training "
        "settings sized for a CPU. --simulate then labels it by simulated labelers over the HTTP API, enough for a "
        "round."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--password", help="Use this password for every demo user instead of random ones.")
        parser.add_argument(
            "--simulate",
            action="store_true",
            help=f"Then {SIMULATED} simulated labelers (sim-demo-0..{SIMULATED - 1}) label every demo pair through the "
            "HTTP API, judging by each pair's known better answer with noise, and agreement is computed.",
        )
        parser.add_argument(
            "--url", help="With --simulate: the running server to label through (default: one started here)."
        )
        parser.add_argument(
            "--noise", type=float, default=0.15, help="With --simulate: chance a bot picks the worse answer."
        )
        parser.add_argument("--seed", type=int, default=1, help="With --simulate: seed of the bots' noise.")

    def handle(
        self, *args: object, password: str | None, simulate: bool, url: str | None, noise: float, seed: int,
        **options: object,
    ) -> None:  # fmt: skip
        from rounds.models import TrainingSettings

        if not 0 <= noise <= 1:
            raise CommandError(f"--noise must be between 0 and 1, got {noise}")
        credentials = {}
        with transaction.atomic():
            try:
                project, result = pairs_import_file(
                    project_slug="demo", lines=DEMO_FILE.read_bytes().splitlines(), overlap=3
                )
            except ImportRejected as error:
                raise CommandError(f"{DEMO_FILE} is broken: {error}") from None
            project_update(project=project, name="Demo: everyday assistant answers", guidelines=DEMO_GUIDELINES)
            TrainingSettings.objects.update_or_create(project=project, defaults=DEMO_TRAINING)
            for username, admin in [("admin", True)] + [(name, False) for name in DEMO_LABELERS]:
                credentials[username] = password or secrets.token_urlsafe(9)
                labeler_create(username=username, password=credentials[username], admin=admin)
        self.stdout.write(
            f"Project 'demo': {result.created} comparisons added, {result.duplicates} already there "
            f"(overlap {project.overlap})."
        )
        self.stdout.write("Demo users (username / password):")
        for username, secret in credentials.items():
            role = "admin + labeler" if username == "admin" else "labeler"
            self.stdout.write(f"  {username:<8} {secret}   ({role})")
        if simulate:
            self._simulate(project, url, noise, seed)

    def _simulate(self, project: Project, url: str | None, noise: float, seed: int) -> None:
        open_slots = (
            Comparison.objects.filter(project=project, vote_count__lt=F("project__overlap"))
            .annotate(left=F("project__overlap") - F("vote_count"))
            .aggregate(total=Sum("left"))["total"]
            or 0
        )
        decide = demo_judge(noise, seed)
        labelers = {f"sim-demo-{i}": (bot_token(f"sim-demo-{i}"), decide(i)) for i in range(SIMULATED)}
        votes = [0]
        lock = threading.Lock()

        def counted() -> None:
            with lock:
                votes[0] += 1
                progress_bar(min(votes[0], open_slots), open_slots, "simulated votes")

        with _server(url) as base_url:
            try:
                done = simulation.run_labelers(
                    base_url=base_url, project_slug=project.slug, labelers=labelers, on_vote=counted
                )
            except simulation.SimulationError as error:
                raise CommandError(str(error)) from None
        agreement_refresh(project_id=project.pk)
        self.stdout.write(
            f"{done.votes} simulated votes in {done.elapsed_s:.1f} s through {base_url}; agreement computed. "
            "A round can start: python manage.py run_round demo --wait"
        )


def demo_judge(noise: float, seed: int) -> Any:
    """Bot i's decision on a claimed demo pair: the known better answer (or tie, or both bad), and
    with probability `noise` the other side instead."""
    verdicts: dict[frozenset[str], tuple[str, str]] = {}
    for line in DEMO_FILE.read_text().splitlines():
        row = json.loads(line)
        better = row["meta"]["better"]
        texts = {"a": row["response_a"], "b": row["response_b"]}
        verdicts[frozenset(texts.values())] = (better, texts.get(better, ""))

    def bot(index: int) -> simulation.Decide:
        rng = random.Random(f"{seed}:{index}")

        def decide(claim: dict[str, Any]) -> dict[str, Any]:
            left, right = claim["left"]["text"], claim["right"]["text"]
            better, text = verdicts.get(frozenset((left, right)), ("tie", ""))
            choice = {"tie": "tie", "both_bad": "both_bad"}.get(better) or ("left" if text == left else "right")
            if rng.random() < noise:
                choice = rng.choice([other for other in ("left", "right") if other != choice])
            return {"choice": choice, "strength": 2}

        return decide

    return bot


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def _server(url: str | None) -> Iterator[str]:
    """The given server's URL, or that of one served from this process for the block's duration."""
    if url:
        yield url
        return
    server = ThreadedWSGIServer(("127.0.0.1", 0), _QuietHandler)
    server.set_app(get_internal_wsgi_application())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
