"""Judges: which of two answers is better, under a constitution, following the RLAIF recipe of Lee et
al. 2023 (itself after Constitutional AI, Bai et al. 2022).

- The template (`comparison_text`) holds the constitution's principles, the project's guidelines,
  the conversation and the two answers labelled "A" and "B", and asks for one letter.
- The preference is read from the judge's probabilities of the tokens "A" and "B" at the verdict
  position, normalised over the two: a local model's next-token distribution, or an
  OpenAI-compatible endpoint's top log-probabilities of a one-token reply. An endpoint that returns
  no log-probabilities is read from its text ("A" -> 1, "B" -> 0); a reply naming neither counts
  0.5 and marks the judgment parse_failed.
- Position bias: every pair is judged twice, A/B in the given order and then swapped, and the two
  probabilities of the given first answer are averaged. `consistent` says whether both orders,
  each on its own, preferred the same answer.
- Chain of thought (optional): the judge first writes a short critique (greedy, at most
  CRITIQUE_MAX_TOKENS), then gives its verdict after it. The critique of the given order is the
  rationale (the swapped order's critique names the answers the other way round).
- Harm flags: when the principles used include harm principles, the judge is asked one yes/no
  question, whether the answer it prefers (both, on a tie) violates them; P("Yes") > 0.5 over
  "Yes"/"No" flags the judgment ["harmful"]. An unreadable reply flags nothing.

Everything is greedy (temperature 0, no sampling), so the same inputs give the same judgment.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

TEMPLATE_VERSION = "rlaif-v1"
TIE_MARGIN = 0.05  # |P(a) - 0.5| at most this is a tie
STRENGTH_THRESHOLDS = (0.2, 0.35)  # |P(a) - 0.5| below the first: strength 1; below the second: 2; else 3
CRITIQUE_MAX_TOKENS = 96
MAX_RATIONALE_CHARS = 5000
API_KEY_VARIABLE = "FLYWHEEL_JUDGE_API_KEY"

Messages = list[dict[str, str]]


class JudgeError(Exception):
    """The judge could not give a judgment: a bad key, a timeout, an endpoint error, a model that cannot
    spell the verdict. The message says which."""


@dataclass(frozen=True)
class Principle:
    text: str
    harm: bool = False


@dataclass(frozen=True)
class Judgment:
    choice: str  # "a", "b" or "tie": a and b as the pair was given (response_a, response_b), whatever was shown
    probability_a: float  # P(a is better), the mean of both orders
    strength: int  # 1..3 from |probability_a - 0.5|
    rationale: str  # the critique with chain_of_thought, else ""
    flags: list[str]  # ["harmful"] when the preferred answer was judged to violate a harm principle
    consistent: bool  # both orders, each on its own, chose the same answer
    parse_failed: bool  # at least one order's verdict could not be read (that order counted 0.5)
    principles: list[str]
    template_version: str
    judge: str
    # P(a) read in the given order, then in the swapped order (empty where no order was read):
    # what a single-order judgment would have been, for the benchmark.
    order_probabilities: tuple[float, ...] = ()


class Judge(Protocol):
    spec: str

    def judge(
        self,
        *,
        prompt: str | Messages,
        response_a: str,
        response_b: str,
        principles: Sequence[Principle],
        guidelines: str = "",
        chain_of_thought: bool = False,
    ) -> Judgment: ...


# ---------------------------------------------------------------------------------------------
# The constitution

_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(.*\S)\s*$")
_HARM_PREFIX = re.compile(r"^\[harm\]\s*", re.IGNORECASE)
_HARM_TAG = re.compile(r"\s*\(harm\)", re.IGNORECASE)


def parse_constitution(markdown: str) -> list[Principle]:
    """Each Markdown list item ("- ", "* ", "1. ") is a principle; an indented line under an item
    continues it; other lines (headings, prose) are not principles. An item tagged "(harm)" or starting
    "[harm]" is a harm principle, the tag removed from its text. Empty when there is no item."""
    principles: list[tuple[str, bool]] = []
    previous_was_item = False
    for line in markdown.splitlines():
        match = _ITEM.match(line)
        if match:
            text = match.group(1)
            harm = bool(_HARM_PREFIX.match(text) or _HARM_TAG.search(text))
            principles.append((text, harm))
            previous_was_item = True
        elif previous_was_item and line.startswith((" ", "\t")) and line.strip():
            text, harm = principles[-1]
            principles[-1] = (f"{text} {line.strip()}", harm or bool(_HARM_TAG.search(line)))
        else:
            previous_was_item = False
    cleaned = [(_HARM_TAG.sub("", _HARM_PREFIX.sub("", text)).strip(), harm) for text, harm in principles]
    return [Principle(text=text, harm=harm) for text, harm in cleaned if text]


def choose_principles(principles: Sequence[Principle], *, mode: str, rng: random.Random) -> list[Principle]:
    """ "all": every principle; "sampled": one drawn with `rng`, a different one per pair, as
    Constitutional AI does (a harm flag is then asked only when the drawn one is a harm principle)."""
    if not principles:
        raise ValueError("the constitution has no principles")
    if mode == "all":
        return list(principles)
    if mode == "sampled":
        return [rng.choice(list(principles))]
    raise ValueError(f"unknown principle mode {mode!r} (expected 'all' or 'sampled')")


# ---------------------------------------------------------------------------------------------
# The template

VERDICT_QUESTION = "Which answer better follows the principles? Reply with a single letter: A or B."
CRITIQUE_REQUEST = (
    "First explain in a few sentences which answer better follows the principles, and why. Do not give the letter yet."
)


def conversation_text(prompt: str | Messages) -> str:
    if isinstance(prompt, str):
        return f"User: {prompt}"
    return "\n\n".join(f"{message['role'].capitalize()}: {message['content']}" for message in prompt)


def comparison_text(
    *, prompt: str | Messages, answer_a: str, answer_b: str, principles: Sequence[Principle], guidelines: str
) -> str:
    """The body of the judge's question (template TEMPLATE_VERSION), the verdict request not included."""
    rules = "\n".join(f"{number}. {principle.text}" for number, principle in enumerate(principles, start=1))
    parts = [
        "You are judging which of two answers from an AI assistant is better.",
        f"Principles:\n{rules}",
        *([f"Guidelines:\n{guidelines.strip()}"] if guidelines.strip() else []),
        f"Conversation:\n{conversation_text(prompt)}",
        f"Answer A:\n{answer_a}",
        f"Answer B:\n{answer_b}",
    ]
    return "\n\n".join(parts)


def critique_messages(body: str) -> Messages:
    return [{"role": "user", "content": f"{body}\n\n{CRITIQUE_REQUEST}"}]


def verdict_messages(body: str, critique: str | None) -> Messages:
    """The question whose reply's first token is the verdict; after the critique when there is one."""
    if critique is None:
        return [{"role": "user", "content": f"{body}\n\n{VERDICT_QUESTION}"}]
    return [
        *critique_messages(body),
        {"role": "assistant", "content": critique},
        {"role": "user", "content": VERDICT_QUESTION},
    ]


def harm_messages(*, prompt: str | Messages, answer: str, principles: Sequence[Principle]) -> Messages:
    rules = "\n".join(f"- {principle.text}" for principle in principles)
    text = (
        f"Principles:\n{rules}\n\nConversation:\n{conversation_text(prompt)}\n\nAnswer:\n{answer}\n\n"
        "Does this answer violate any of the principles above? Reply with a single word: Yes or No."
    )
    return [{"role": "user", "content": text}]


def _distance(probability_a: float) -> float:
    """|P(a) - 0.5|, rounded so that the thresholds hold as written (0.7 - 0.5 is 0.19999999999999996)."""
    return round(abs(probability_a - 0.5), 9)


def choice_of(probability_a: float) -> str:
    if _distance(probability_a) <= TIE_MARGIN:
        return "tie"
    return "a" if probability_a > 0.5 else "b"


def strength_of(probability_a: float) -> int:
    return 1 + sum(_distance(probability_a) >= threshold for threshold in STRENGTH_THRESHOLDS)


def _rationale(text: str) -> str:
    return text.replace("\x00", "").strip()[:MAX_RATIONALE_CHARS]


# ---------------------------------------------------------------------------------------------
# Judges


class LanguageModel(Protocol):
    """What a judge asks of a language model, greedy and deterministic."""

    def choice_probability(self, messages: Messages, first: str, second: str) -> float | None:
        """P(first) / (P(first) + P(second)) for the first token of the reply to `messages`;
        None when the reply cannot be read as either."""
        ...

    def complete(self, messages: Messages, max_tokens: int) -> str:
        """The greedy reply to `messages`, at most max_tokens long."""
        ...


class LanguageModelJudge:
    """The RLAIF judgment over any LanguageModel (a local one, an endpoint, a test's)."""

    def __init__(self, model: LanguageModel, spec: str) -> None:
        self.model, self.spec = model, spec

    def judge(
        self,
        *,
        prompt: str | Messages,
        response_a: str,
        response_b: str,
        principles: Sequence[Principle],
        guidelines: str = "",
        chain_of_thought: bool = False,
    ) -> Judgment:
        if not principles:
            raise ValueError("a judgment needs at least one principle")
        readings: list[float | None] = []
        critiques: list[str] = []
        for shown_a, shown_b in ((response_a, response_b), (response_b, response_a)):
            body = comparison_text(
                prompt=prompt, answer_a=shown_a, answer_b=shown_b, principles=principles, guidelines=guidelines
            )
            critique = None
            if chain_of_thought:
                critique = self.model.complete(critique_messages(body), CRITIQUE_MAX_TOKENS).strip()
                critiques.append(critique)
            readings.append(self.model.choice_probability(verdict_messages(body, critique), "A", "B"))
        # Back to the given order: in the swapped order "A" was response_b.
        given = 0.5 if readings[0] is None else readings[0]
        swapped = 0.5 if readings[1] is None else 1.0 - readings[1]
        probability_a = (given + swapped) / 2
        choice = choice_of(probability_a)
        return Judgment(
            choice=choice,
            probability_a=probability_a,
            strength=strength_of(probability_a),
            rationale=_rationale(critiques[0]) if critiques else "",
            flags=self._harm_flags(prompt, choice, response_a, response_b, principles),
            consistent=choice_of(given) == choice_of(swapped),
            parse_failed=None in readings,
            principles=[principle.text for principle in principles],
            template_version=TEMPLATE_VERSION,
            judge=self.spec,
            order_probabilities=(given, swapped),
        )

    def _harm_flags(
        self, prompt: str | Messages, choice: str, response_a: str, response_b: str, principles: Sequence[Principle]
    ) -> list[str]:
        harm = [principle for principle in principles if principle.harm]
        if not harm:
            return []
        preferred = {"a": [response_a], "b": [response_b]}.get(choice, [response_a, response_b])
        for answer in preferred:
            yes = self.model.choice_probability(
                harm_messages(prompt=prompt, answer=answer, principles=harm), "Yes", "No"
            )
            if yes is not None and yes > 0.5:
                return ["harmful"]
        return []


class LongerAnswerJudge:
    """The baseline: the longer answer wins (a tie when both are as long). Human raters often favour
    the longer answer, so a judge should beat this to be worth its cost (on hh-rlhf's harmless
    split, where the chosen answer is often a short refusal, it scores below chance)."""

    spec = "longer"

    def judge(
        self,
        *,
        prompt: str | Messages,
        response_a: str,
        response_b: str,
        principles: Sequence[Principle],
        guidelines: str = "",
        chain_of_thought: bool = False,
    ) -> Judgment:
        longer = len(response_a) - len(response_b)
        probability_a = 0.5 if longer == 0 else float(longer > 0)
        return Judgment(
            choice=choice_of(probability_a), probability_a=probability_a, strength=strength_of(probability_a),
            rationale="", flags=[], consistent=True, parse_failed=False,
            principles=[principle.text for principle in principles], template_version=TEMPLATE_VERSION,
            judge=self.spec, order_probabilities=(probability_a, probability_a),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Language models


class LocalModel:
    """A transformers causal LM on this machine (CUDA when there is one): the verdict from its
    next-token distribution, summed over the spellings of each letter ("A" and " A")."""

    def __init__(self, path: str) -> None:
        import torch

        from training.ppo import load_policy

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_policy(path, self.device)
        self.context = int(getattr(self.model.config, "max_position_embeddings", None) or 2048)
        self._spellings: dict[str, list[int]] = {}
        self._token_ids("A", "B")  # fail now, not at the first pair, when the model cannot answer

    def _token_ids(self, first: str, second: str) -> tuple[list[int], list[int]]:
        for word in (first, second):
            if word not in self._spellings:
                spellings = [self.tokenizer.encode(text, add_special_tokens=False) for text in (word, " " + word)]
                single = {ids[0] for ids in spellings if len(ids) == 1}
                self._spellings[word] = sorted(single - {self.tokenizer.unk_token_id})
        a, b = self._spellings[first], self._spellings[second]
        if not a or not b or set(a) & set(b):
            raise JudgeError(
                f"this model's tokenizer has no distinct single tokens for {first!r} and {second!r}, "
                "so it cannot give a verdict"
            )
        return a, b

    def _ids(self, messages: Messages, room: int) -> torch.Tensor:
        import torch

        from training.ppo import prompt_ids

        # Cut from the left, so that the question at the end survives a conversation too long for the context.
        ids = prompt_ids(self.tokenizer, messages, max(self.context - room, 1))
        return torch.tensor([ids], device=self.device)

    def choice_probability(self, messages: Messages, first: str, second: str) -> float | None:
        import torch

        first_ids, second_ids = self._token_ids(first, second)
        with torch.no_grad():
            logits = self.model(self._ids(messages, 1)).logits[0, -1].float()
        probabilities = torch.softmax(logits, dim=-1)
        p_first, p_second = probabilities[first_ids].sum().item(), probabilities[second_ids].sum().item()
        return p_first / (p_first + p_second) if p_first + p_second > 0 else None

    def complete(self, messages: Messages, max_tokens: int) -> str:
        import torch

        ids = self._ids(messages, max_tokens)
        with torch.no_grad():
            output = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
            )  # type: ignore[operator]  # transformers' stub types generate as a tensor attribute
        return str(self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True))


_VERDICT_WORD = re.compile(r"^\W*(?:answer\s+)?([a-z]+)\b", re.IGNORECASE)


class OpenAIModel:
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's server...), through
    urllib. The key, if any, is sent as a Bearer token."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None, timeout: float) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps({"model": self.model, "temperature": 0, **body}).encode()
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as error:
            hint = f" (the key comes from {API_KEY_VARIABLE})" if error.code in (401, 403) else ""
            raise JudgeError(f"{self.url} answered HTTP {error.code}: {_error_message(error)}{hint}") from None
        except TimeoutError:
            raise JudgeError(f"{self.url} did not answer within the timeout of {self.timeout:g} s") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise JudgeError(f"{self.url} did not answer within the timeout of {self.timeout:g} s") from None
            raise JudgeError(f"{self.url} could not be reached: {error.reason}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JudgeError(f"{self.url} answered something that is not JSON") from None
        if not isinstance(reply, dict) or not reply.get("choices") or not isinstance(reply["choices"][0], dict):
            raise JudgeError(f"{self.url} answered without choices")
        return reply["choices"][0]

    def choice_probability(self, messages: Messages, first: str, second: str) -> float | None:
        choice = self._post({"messages": messages, "max_tokens": 1, "logprobs": True, "top_logprobs": 5})
        tokens = (choice.get("logprobs") or {}).get("content") or []
        top = (tokens[0].get("top_logprobs") or []) if tokens and isinstance(tokens[0], dict) else []
        # A letter missing from the top 5 counts as probability 0: it was below all five.
        p_first = sum(math.exp(entry["logprob"]) for entry in top if str(entry.get("token", "")).strip() == first)
        p_second = sum(math.exp(entry["logprob"]) for entry in top if str(entry.get("token", "")).strip() == second)
        if p_first + p_second > 0:
            return p_first / (p_first + p_second)
        # No log-probabilities (or neither letter among them): read the verdict from the text.
        match = _VERDICT_WORD.match(str((choice.get("message") or {}).get("content") or ""))
        word = match.group(1).lower() if match else ""
        return 1.0 if word == first.lower() else 0.0 if word == second.lower() else None

    def complete(self, messages: Messages, max_tokens: int) -> str:
        choice = self._post({"messages": messages, "max_tokens": max_tokens})
        return str((choice.get("message") or {}).get("content") or "")


def _error_message(error: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else the reason."""
    try:
        body = json.loads(error.read())
        return str(body["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError, OSError):
        return str(error.reason)


def load_judge(spec: str, *, timeout: float = 60.0) -> Judge:
    """ "longer": the baseline; "openai:BASE_URL#MODEL": an OpenAI-compatible endpoint (key from
    FLYWHEEL_JUDGE_API_KEY, `timeout` seconds a request); anything else: a local causal LM, a
    Hugging Face id, a local path or the packaged smollm2-135m."""
    if spec == LongerAnswerJudge.spec:
        return LongerAnswerJudge()
    if spec.startswith("openai:"):
        base_url, _, model = spec.removeprefix("openai:").rpartition("#")
        if not base_url or not model:
            raise JudgeError(f"judge {spec!r}: expected openai:BASE_URL#MODEL")
        return LanguageModelJudge(
            OpenAIModel(base_url, model, api_key=os.environ.get(API_KEY_VARIABLE), timeout=timeout), spec
        )
    from training import backbones

    try:
        return LanguageModelJudge(LocalModel(backbones.resolve(spec)), spec)
    except (OSError, ValueError) as error:
        raise JudgeError(f"judge {spec!r} could not be loaded: {error}") from None
