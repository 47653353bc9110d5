"""Test data built through the same services the product uses: users, projects and pairs, votes,
and the voted projects the training tests learn from."""

import itertools
import json
from pathlib import Path

from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from annotation.importing import PairRecord
from annotation.models import Project
from annotation.services import (
    agreement_refresh,
    assignment_claim,
    labeler_create,
    pairs_import,
    project_get_or_create,
    vote_submit,
)
from tests.tiny_models import marker_pairs

PASSWORD = "correct-horse-battery"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"
_slugs = itertools.count()
GOOD_PAIR = {"prompt": "Say hi", "response_a": "Hi!", "response_b": "Hello there."}  # one valid import line


def write_lines(tmp_path: Path, lines: list, name: str = "pairs.jsonl") -> Path:
    """An import file: JSON objects a line, or raw bytes for lines that are broken on purpose."""
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines))
    return path


def make_records(count: int, *, tag: str = "") -> list[PairRecord]:
    return [
        PairRecord(
            line=index + 1,
            prompt=f"Question {tag}{index}: how do I boil an egg?",
            response_a=f"Answer A{tag}{index}: put it in boiling water for 8 minutes.",
            response_b=f"Answer B{tag}{index}: eggs cannot be boiled.",
            source_a="model-a",
            source_b="model-b",
        )
        for index in range(count)
    ]


def make_project(*, pairs: int = 5, overlap: int = 3, lease_seconds: int = 600) -> Project:
    project = project_get_or_create(slug=f"project-{next(_slugs)}", overlap=overlap)
    project.lease_seconds = lease_seconds
    project.save(update_fields=["lease_seconds"])
    pairs_import(project=project, records=make_records(pairs, tag=project.slug))
    return project


def api_client_for(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def label_all(project, labelers, decide, judgment=None) -> None:
    """Labelers take turns claiming until nothing is left; decide(labeler, comparison) -> canonical
    choice, and for AI labelers judgment(labeler, comparison) -> the vote's judgment."""
    busy = True
    while busy:
        busy = False
        for labeler in labelers:
            assignment = assignment_claim(project=project, labeler=labeler)
            if assignment is None:
                continue
            busy = True
            canonical = decide(labeler, assignment.comparison)
            screen = {"a": "left", "b": "right"} if assignment.left_is_a else {"a": "right", "b": "left"}
            vote_submit(
                assignment_id=assignment.pk,
                labeler=labeler,
                choice=screen.get(canonical, canonical),
                strength=1 + assignment.comparison.pk % 3,
                judgment=judgment(labeler, assignment.comparison) if judgment else None,
            )


TINY = {"max_length": 32, "learning_rate": 3e-3, "epochs": 2, "batch_size": 16, "checkpoint_every": 2}


def voted_project(pairs: int = 120):
    """Pairs voted on by two simulated labelers who always prefer the answer with the marker."""
    project = make_project(pairs=0, overlap=2)
    rows = marker_pairs(pairs)
    pairs_import(
        project=project,
        records=[PairRecord(line=i, prompt=r["prompt"], response_a=r["chosen"], response_b=r["rejected"])
                 for i, r in enumerate(rows)],
    )  # fmt: skip
    labelers = [labeler_create(username=f"bot{i}", password=PASSWORD) for i in range(2)]
    label_all(project, labelers, lambda labeler, comparison: "a")
    agreement_refresh(project_id=project.pk)
    return project
