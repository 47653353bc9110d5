"""import_pairs: both file formats, duplicates, and one clear line-numbered error per bad line."""

import gzip
import json

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from annotation.models import Comparison, Project, Prompt, Response
from tests.factories import GOOD_PAIR, SHARED_DATA, write_lines

pytestmark = pytest.mark.django_db


def test_imports_text_and_conversation_prompts(tmp_path, capsys):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    path = write_lines(
        tmp_path,
        [GOOD_PAIR, {"prompt": conversation, "response_a": "6", "response_b": "7", "meta": {"topic": "math"}}],
    )
    call_command("import_pairs", "greetings", str(path), "--overlap", "2")
    project = Project.objects.get(slug="greetings")
    assert project.overlap == 2
    assert "2 comparisons created, 0 duplicates skipped" in capsys.readouterr().out
    math = Comparison.objects.get(meta__topic="math")
    assert math.prompt.messages == conversation
    assert (math.response_a.text, math.response_b.text) == ("6", "7")


def test_duplicates_are_skipped_and_counted_also_in_swapped_order(tmp_path, capsys):
    swapped = {**GOOD_PAIR, "response_a": GOOD_PAIR["response_b"], "response_b": GOOD_PAIR["response_a"]}
    call_command("import_pairs", "p", str(write_lines(tmp_path, [GOOD_PAIR, GOOD_PAIR, swapped])))
    assert "1 comparisons created, 2 duplicates skipped" in capsys.readouterr().out
    call_command("import_pairs", "p", str(write_lines(tmp_path, [GOOD_PAIR])))
    assert "0 comparisons created, 1 duplicates skipped" in capsys.readouterr().out
    assert (Comparison.objects.count(), Prompt.objects.count()) == (1, 1)


BAD_LINES = [
    (b'{"prompt": "x", "response_a": "a"', "line 2: invalid JSON"),
    (b'{"prompt": "caf\xe9", "response_a": "a", "response_b": "b"}', "line 2: not valid UTF-8 (byte 0xe9"),
    ({"prompt": "x", "response_a": "a"}, "line 2: missing field 'response_b'"),
    ({"prompt": 7, "response_a": "a", "response_b": "b"}, "line 2: field 'prompt' must be a string or a list"),
    ({"prompt": "x", "response_a": ["a"], "response_b": "b"}, "line 2: field 'response_a' must be a string, got list"),
    ({"prompt": "x", "response_a": "   ", "response_b": "b"}, "line 2: field 'response_a' is empty"),
    ({"prompt": "", "response_a": "a", "response_b": "b"}, "line 2: field 'prompt' is empty"),
    ({"prompt": "x", "response_a": "a", "response_b": "b", "meta": "m"}, "line 2: field 'meta' must be an object"),
    ({"prompt": "x", "response_a": "same", "response_b": "same"}, "line 2: response_a and response_b are identical"),
    ({"prompt": "x", "response_a": "a", "response_b": "b", "extra": 1}, "line 2: unknown field 'extra'"),
    (["prompt", "x"], "line 2: expected a JSON object, got list"),
    ({"prompt": [{"role": "user"}], "response_a": "a", "response_b": "b"}, "line 2: field 'prompt' message 0"),
    ({"prompt": [{"role": "bot", "content": "x"}], "response_a": "a", "response_b": "b"}, "role 'bot'"),
    (
        {
            "prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
            "response_a": "a",
            "response_b": "b",
        },
        "line 2: field 'prompt': the last message must be the user's",
    ),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yo"}, "line 2: missing field 'rejected'"),
    (
        {"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
        "final Assistant turn is empty",
    ),
    (
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        "differ before their final",
    ),
    ({"chosen": "Human: hi", "rejected": "\n\nHuman: hi\n\nAssistant: no"}, "text before the first 'Human:' turn"),
    (b'{"prompt": "' + b"x" * 2000 + b'", "response_a": "a", "response_b": "b"}', "line 2: line is 2,"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_LINES)
@override_settings(FLYWHEEL_IMPORT_MAX_LINE_BYTES=1000)
def test_a_bad_line_aborts_with_its_line_number_and_writes_nothing(tmp_path, bad, message):
    path = write_lines(tmp_path, [GOOD_PAIR, bad, {**GOOD_PAIR, "prompt": "another"}])
    with pytest.raises(CommandError) as error:
        call_command("import_pairs", "new-project", str(path))
    assert message in str(error.value)
    assert "nothing imported" in str(error.value)
    assert (Project.objects.count(), Prompt.objects.count(), Response.objects.count()) == (0, 0, 0)


def test_every_bad_line_is_reported(tmp_path):
    path = write_lines(tmp_path, [b"{", GOOD_PAIR, b"[", {"prompt": "x"}])
    with pytest.raises(CommandError) as error:
        call_command("import_pairs", "p", str(path))
    assert all(f"line {n}:" in str(error.value) for n in (1, 3, 4))


def test_skip_invalid_imports_the_good_lines(tmp_path, capsys):
    call_command("import_pairs", "p", str(write_lines(tmp_path, [GOOD_PAIR, b"{"])), "--skip-invalid")
    captured = capsys.readouterr()
    assert "1 comparisons created" in captured.out and "1 invalid lines skipped" in captured.out
    assert "line 2: invalid JSON" in captured.err


def test_missing_file_and_bad_overlap_are_clear_errors(tmp_path):
    with pytest.raises(CommandError, match="No such file"):
        call_command("import_pairs", "p", str(tmp_path / "absent.jsonl"))
    with pytest.raises(CommandError, match=r"overlap: 0 is outside 1\.\.32767"):
        call_command("import_pairs", "p", str(write_lines(tmp_path, [GOOD_PAIR])), "--overlap", "0")


@pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"{SHARED_DATA} is not beside the repository")
def test_hh_rlhf_transcripts_split_into_prompt_and_final_answers(tmp_path, capsys):
    path = tmp_path / "hh.jsonl"
    with gzip.open(SHARED_DATA, "rb") as source:
        path.write_bytes(source.read())
    # The real file has five malformed lines (four empty chosen answers, one broken transcript):
    # a strict import refuses it, naming them; --skip-invalid takes the rest.
    with pytest.raises(CommandError) as error:
        call_command("import_pairs", "hh", str(path))
    assert "line 87: field 'chosen': the final Assistant turn is empty" in str(error.value)
    assert "line 1255: chosen and rejected differ before their final Assistant turn" in str(error.value)
    call_command("import_pairs", "hh", str(path), "--skip-invalid")
    assert "1595 comparisons created" in capsys.readouterr().out

    first = json.loads(path.read_text().splitlines()[0])
    comparison = Comparison.objects.get(
        project__slug="hh",
        meta__known_preference="a",
        prompt__messages__0__content=("what are some pranks with a pen i can do?"),
    )
    assert comparison.prompt.messages[-1]["role"] == "user"
    assert first["chosen"].endswith(comparison.response_a.text)
    assert first["rejected"].endswith(comparison.response_b.text)
    assert (comparison.response_a.source, comparison.response_b.source) == ("chosen", "rejected")
