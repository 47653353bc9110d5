"""Simulated labelers: a hidden scoring function, a noisy judge, and bots that label through the
HTTP API. Standard library only (no Django, no torch), so that tests, benchmarks and the PPO loop's
hidden gold score can all import it.

The judge follows Bradley-Terry: with score gap d = score(left) - score(right) and noise
temperature T, the bot picks left with probability sigmoid(d / T). T = 0 is deterministic: the
higher score wins and equal scores give a tie vote (with T > 0, equal scores are a coin flip).
Strength comes from |d| alone: 1 below 1, 2 from 1 to below 2, 3 from 2 up; a bot that noise
turned against the scores keeps that strength, as real labelers are sometimes confidently wrong.

Noise and agreement: on typical marker pairs (one answer holds the marker once, the other not at
all, so |d| = 1) a bot is right with p = sigmoid(1 / T) and two bots agree with p² + (1 - p)².
InstructGPT reports 72.6 ± 1.5% agreement between its labelers; T = AGREEMENT_NOISE = 0.6 gives
p = 0.841 and 73.3% (checked by simulation in tests/test_simulate_labelers.py).
"""

import http.client
import json
import math
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

Score = Callable[[str], float]

AGREEMENT_NOISE = 0.6
REQUEST_TIMEOUT_S = 30.0
EMPTY_CLAIMS_TO_STOP, EMPTY_CLAIM_WAIT_S = 3, 0.2  # a bot stops after 3 empty claims 0.2 s apart
MAX_REFUSALS_IN_A_ROW = 5


def _marker(text: str, word: str) -> float:
    return float(text.lower().count(word.lower()))


def _length(text: str, _: str) -> float:
    return len(text) / 100


def _shorter(text: str, _: str) -> float:
    return -len(text) / 100


# name -> (score of a text given the argument after "name:", whether that argument is required).
# marker:WORD counts WORD (case-insensitive); length and shorter give one point per 100 characters.
PREFERENCES: dict[str, tuple[Callable[[str, str], float], bool]] = {
    "marker": (_marker, True),
    "length": (_length, False),
    "shorter": (_shorter, False),
}


def preference(spec: str) -> Score:
    """The scoring function named by `spec` ("marker:banana", "length", "shorter"): text -> score."""
    name, _, argument = spec.partition(":")
    if name not in PREFERENCES:
        raise ValueError(f"unknown preference {spec!r}; known: marker:WORD, length, shorter")
    function, takes_argument = PREFERENCES[name]
    if takes_argument and not argument.strip():
        raise ValueError(f"{name} needs an argument: {name}:WORD")
    if not takes_argument and argument:
        raise ValueError(f"{name} takes no argument, got {spec!r}")
    return lambda text: function(text, argument)


def sigmoid(x: float) -> float:
    return 0.5 * (1 + math.tanh(x / 2))  # no overflow for large |x|, unlike 1 / (1 + exp(-x))


@dataclass(frozen=True)
class Verdict:
    choice: str  # "left", "right" or "tie", as the vote API takes it
    strength: int


def judge(score: Score, left: str, right: str, *, noise: float, rng: random.Random) -> Verdict:
    gap = score(left) - score(right)
    strength = min(3, 1 + int(abs(gap)))
    if noise == 0:
        if gap == 0:
            return Verdict("tie", 1)
        return Verdict("left" if gap > 0 else "right", strength)
    return Verdict("left" if rng.random() < sigmoid(gap / noise) else "right", strength)


# --------------------------------------------------------------------------------------------
# Bots on the HTTP API
# --------------------------------------------------------------------------------------------


class SimulationError(Exception):
    """The bots could not go on; the message says why."""


@dataclass(frozen=True)
class BotResult:
    votes: int
    refused: int  # votes the server answered 409 (a lease that expired under the bot)


@dataclass(frozen=True)
class Summary:
    bots: dict[str, BotResult]
    elapsed_s: float

    @property
    def votes(self) -> int:
        return sum(bot.votes for bot in self.bots.values())

    @property
    def votes_per_second(self) -> float:
        return self.votes / self.elapsed_s if self.elapsed_s > 0 else 0.0


class _Budget:
    """Votes still allowed across all bots (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self._left = limit
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._left is None:
                return True
            if self._left <= 0:
                return False
            self._left -= 1
            return True

    def give_back(self) -> None:
        with self._lock:
            if self._left is not None:
                self._left += 1


class _Session:
    """One keep-alive connection with the bot's token."""

    def __init__(self, base_url: str, token: str) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SimulationError(f"the server URL must look like http://host:port, got {base_url!r}")
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.connection = connection_class(parts.hostname, parts.port, timeout=REQUEST_TIMEOUT_S)
        self.base_url = base_url
        self.prefix = parts.path.rstrip("/")
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

    def post(self, path: str, body: dict[str, Any] | None = None, key: str | None = None) -> tuple[int, Any]:
        """Status and decoded JSON body. A connection the server closed between requests is reopened
        once; that retry is safe because a repeated claim renews the same lease and a vote carries
        an idempotency key."""
        headers = self.headers if key is None else {**self.headers, "Idempotency-Key": key}
        payload = b"" if body is None else json.dumps(body).encode()
        for attempt in (1, 2):
            try:
                self.connection.request("POST", self.prefix + path, body=payload, headers=headers)
                response = self.connection.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as error:
                self.connection.close()
                if attempt == 2:
                    raise SimulationError(f"{self.base_url} dropped the connection twice: {error}") from None
            except OSError as error:
                raise SimulationError(f"cannot reach the server at {self.base_url}: {error}") from None
        try:
            return response.status, json.loads(data) if data else None
        except ValueError:
            return response.status, data[:200].decode(errors="replace")


def _refusal(what: str, status: int, body: Any) -> SimulationError:
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return SimulationError(f"{what} answered {status}: {detail}")


# A labeler's decision: the claim as the API answers it in, the vote's body out.
Decide = Callable[[dict[str, Any]], dict[str, Any]]


def _labeler(
    session: _Session, slug: str, decide: Decide, budget: _Budget, stop: threading.Event, on_vote: Callable[[], None]
) -> BotResult:
    votes = refused = refused_in_a_row = 0
    while not stop.is_set() and budget.take():
        status, claim = session.post(f"/api/v1/projects/{slug}/assignments/")
        for _ in range(EMPTY_CLAIMS_TO_STOP - 1):
            # A 204 can be momentary: another bot's claim holds the last free row's lock (SKIP
            # LOCKED), and when it has voted that row has room again.
            if status != 204 or stop.is_set():
                break
            time.sleep(EMPTY_CLAIM_WAIT_S)
            status, claim = session.post(f"/api/v1/projects/{slug}/assignments/")
        if status == 204:
            budget.give_back()
            break
        if status != 201:
            raise _refusal(f"claim in project {slug!r}", status, claim)
        status, vote = session.post(
            f"/api/v1/assignments/{claim['assignment']}/vote/", decide(claim), key=uuid.uuid4().hex
        )
        if status == 409:
            budget.give_back()
            refused, refused_in_a_row = refused + 1, refused_in_a_row + 1
            if refused_in_a_row >= MAX_REFUSALS_IN_A_ROW:
                raise _refusal(f"{MAX_REFUSALS_IN_A_ROW} votes in a row; the last", status, vote)
            continue
        if status not in (200, 201):
            raise _refusal(f"vote on assignment {claim['assignment']}", status, vote)
        votes, refused_in_a_row = votes + 1, 0
        on_vote()
    return BotResult(votes=votes, refused=refused)


def run_labelers(
    *,
    base_url: str,
    project_slug: str,
    labelers: dict[str, tuple[str, Decide]],
    max_votes: int | None = None,
    on_vote: Callable[[], None] = lambda: None,
) -> Summary:
    """Run one labeler per name (its API token and its decision), each in its own thread on its own
    connection, claiming and voting until the project has nothing left for it or `max_votes` votes
    are cast in all. The first error stops the others and is raised as SimulationError."""
    budget, stop = _Budget(max_votes), threading.Event()

    def work(name: str) -> BotResult:
        token, decide = labelers[name]
        try:
            return _labeler(_Session(base_url, token), project_slug, decide, budget, stop, on_vote)
        except SimulationError as error:
            stop.set()
            raise SimulationError(f"{name}: {error}") from None

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, len(labelers))) as pool:
        futures = {name: pool.submit(work, name) for name in labelers}
        results = {name: future.result() for name, future in futures.items()}
    return Summary(bots=results, elapsed_s=time.perf_counter() - start)


def run_bots(
    *,
    base_url: str,
    project_slug: str,
    tokens: dict[str, str],
    score: Score,
    noise: float,
    max_votes: int | None = None,
    seed: int | None = None,
) -> Summary:
    """Simulated labelers, one per (name, API token), voting by `score` with Bradley-Terry noise
    (run_labelers runs them)."""
    if noise < 0:
        raise SimulationError(f"noise must be 0 or more, got {noise}")

    def decider(name: str) -> Decide:
        rng = random.Random(None if seed is None else f"{seed}:{name}")

        def decide(claim: dict[str, Any]) -> dict[str, Any]:
            verdict = judge(score, claim["left"]["text"], claim["right"]["text"], noise=noise, rng=rng)
            return {"choice": verdict.choice, "strength": verdict.strength}

        return decide

    labelers = {name: (token, decider(name)) for name, token in tokens.items()}
    return run_labelers(base_url=base_url, project_slug=project_slug, labelers=labelers, max_votes=max_votes)
