"""The real hh-rlhf file: import, labeled through the HTTP API by simulated labelers, exported back."""

import gzip
import json
import random

import pytest
from django.core.management import call_command

from annotation.models import Comparison
from annotation.services import agreement_refresh, labeler_create
from tests.factories import PASSWORD, SHARED_DATA, api_client_for

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"{SHARED_DATA} is not beside the repository"),
]


def test_hh_rlhf_imports_gets_labeled_through_the_api_and_exports_back(tmp_path):
    source = tmp_path / "hh.jsonl"
    with gzip.open(SHARED_DATA, "rb") as handle:
        source.write_bytes(handle.read())
    call_command("import_pairs", "hh", str(source), "--overlap", "1", "--skip-invalid")
    originals = {}
    for line in source.read_text().splitlines():
        row = json.loads(line)
        originals[_normalized(row["chosen"])] = _normalized(row["rejected"])

    # Simulated labelers who agree with the original annotators, voting through the HTTP API.
    clients = [api_client_for(labeler_create(username=f"bot{i}", password=PASSWORD)) for i in range(3)]
    rng = random.Random(0)
    active = list(clients)
    while active:
        client = rng.choice(active)
        response = client.post("/api/v1/projects/hh/assignments/")
        if response.status_code == 204:
            active.remove(client)
            continue
        body = response.json()
        comparison = Comparison.objects.select_related("response_a").get(assignments__pk=body["assignment"])
        choice = "left" if body["left"]["text"] == comparison.response_a.text else "right"
        voted = client.post(f"/api/v1/assignments/{body['assignment']}/vote/", {"choice": choice}, format="json")
        assert voted.status_code == 201

    agreement_refresh(project_id=Comparison.objects.get(pk=comparison.pk).project_id)
    out = tmp_path / "export.jsonl"
    call_command("export_pairs", "hh", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1595
    for row in rows:
        # The prompt turns plus the chosen answer rebuild the original chosen transcript exactly
        # (up to the whitespace the importer strips around each turn).
        turns = [*row["prompt"], *row["chosen"]]
        transcript = "".join(
            f"\n\n{'Human' if turn['role'] == 'user' else 'Assistant'}: {turn['content']}" for turn in turns
        )
        assert _normalized(transcript) in originals, transcript[-200:]
        assert originals[_normalized(transcript)].endswith(_normalized(row["rejected"][0]["content"]))


def _normalized(transcript: str) -> str:
    return " ".join(transcript.split())
