"""Streaming export of preference datasets in the Hugging Face format (`prompt`, `chosen`,
`rejected` plus metadata), of TRL's unpaired rows for KTO (`prompt`, `completion`, `label`), and
of raw votes, as JSON Lines or Parquet.

Rows come from one SQL query read through a server-side cursor, and are written out a batch at a
time, so memory stays flat whatever the size of the project.
"""

import functools
import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from django.conf import settings
from django.db import connection, transaction

from annotation.agreement import CHOICES
from annotation.models import Project, Prompt
from annotation.selectors import latest_snapshot

Format = Literal["jsonl", "parquet"]
FORMATS = ("jsonl", "parquet")
SOURCES = ("all", "human", "ai")  # whose votes an export counts
BATCH_ROWS = 2000
FIRST_BATCH_ROWS = 50  # a download starts at once; later batches are bigger

_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


@dataclass(frozen=True)
class PreferenceFilters:
    round: int | None = None
    min_confidence: float = 0.0
    include_ties: bool = False
    min_gold_accuracy: float | None = None  # None: the project's own threshold
    source: str | None = None  # whose votes make the labels: human, ai or all; None: the project's setting


def _stream(sql: str, params: list[Any]) -> Iterator[tuple[Any, ...]]:
    """Rows of a query, fetched in batches from a server-side cursor on PostgreSQL."""
    if connection.vendor != "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            while rows := cursor.fetchmany(BATCH_ROWS):
                yield from rows
        return
    with transaction.atomic():
        connection.ensure_connection()
        with connection.cursor() as plain:
            # Plan for the first rows: the reader consumes them while the rest is still coming.
            plain.execute("SET LOCAL cursor_tuple_fraction = 0.01")
            # JIT compiling costs ~0.4 s before the first row and gains nothing on index plans.
            plain.execute("SET LOCAL jit = off")
        with connection.connection.cursor(name="flywheel_export") as cursor:
            cursor.itersize = BATCH_ROWS
            cursor.execute(sql, params)
            yield from cursor


def excluded_labelers(project: Project, min_gold_accuracy: float | None) -> list[int]:
    """Labelers whose gold accuracy in the latest snapshot is below the threshold."""
    threshold = project.gold_min_accuracy if min_gold_accuracy is None else min_gold_accuracy
    snapshot = latest_snapshot(project=project)
    if threshold is None or snapshot is None:
        return []
    return [
        row["labeler"]
        for row in snapshot.labelers
        if row.get("gold_accuracy") is not None and row["gold_accuracy"] < threshold
    ]


_VOTE_COUNTS = """
           SUM(CASE WHEN v.choice = 'a' THEN 1 ELSE 0 END) AS votes_a,
           SUM(CASE WHEN v.choice = 'b' THEN 1 ELSE 0 END) AS votes_b,
           SUM(CASE WHEN v.choice = 'tie' THEN 1 ELSE 0 END) AS votes_tie,
           SUM(CASE WHEN v.choice = 'both_bad' THEN 1 ELSE 0 END) AS votes_both_bad,
           AVG(v.strength) AS mean_strength
"""
# On PostgreSQL the votes of each comparison are counted as its row goes by (LATERAL over the
# vote index), so rows stream from the first one; a GROUP BY over all votes first would hold the
# first row back for seconds on a big project. SQLite, without LATERAL, groups first.
_COUNTS_LATERAL = (
    "CROSS JOIN LATERAL (SELECT"
    + _VOTE_COUNTS
    + "FROM annotation_vote v WHERE v.comparison_id = c.id {labelers}) counts"
)
_COUNTS_GROUPED = (
    "LEFT JOIN (SELECT v.comparison_id," + _VOTE_COUNTS + "FROM annotation_vote v WHERE 1 = 1 {labelers} "
    "GROUP BY v.comparison_id) counts ON counts.comparison_id = c.id"
)
_PREFERENCES_SQL = """
SELECT c.id, c.round, p.text, p.messages, ra.text, ra.source, rb.text, rb.source,
       COALESCE(counts.votes_a, 0), COALESCE(counts.votes_b, 0), COALESCE(counts.votes_tie, 0),
       COALESCE(counts.votes_both_bad, 0), counts.mean_strength,
       agg.adjudicated_choice, agg.ds_choice, agg.ds_confidence
FROM annotation_comparison c
JOIN annotation_prompt p ON p.id = c.prompt_id
JOIN annotation_response ra ON ra.id = c.response_a_id
JOIN annotation_response rb ON rb.id = c.response_b_id
{counts}
LEFT JOIN annotation_aggregatedlabel agg ON agg.comparison_id = c.id
WHERE c.project_id = %s AND c.origin <> 'gold' {round_filter}
ORDER BY c.id
"""


def preference_rows(project: Project, filters: PreferenceFilters) -> Iterator[dict[str, Any]]:
    """One row per comparison with a decided label: the adjudicated one, else the majority of the
    counted votes. A comparison whose top votes are shared, or below min_confidence, is left out."""
    excluded = excluded_labelers(project, filters.min_gold_accuracy)
    params: list[Any] = [*excluded]
    labeler_filter = f"AND v.labeler_id NOT IN ({', '.join(['%s'] * len(excluded))})" if excluded else ""
    # AI votes that are suggestions (Project.ai_votes) make labels only when asked for.
    source = filters.source or ("all" if project.ai_votes == "count" else "human")
    if source != "all":
        labeler_filter += " AND v.source = %s"
        params.append(source)
    params.append(project.pk)
    counting = _COUNTS_LATERAL if connection.vendor == "postgresql" else _COUNTS_GROUPED
    round_filter = ""
    if filters.round is not None:
        round_filter = "AND c.round = %s"
        params.append(filters.round)
    sql = _PREFERENCES_SQL.format(counts=counting.format(labelers=labeler_filter), round_filter=round_filter)
    conversational = _conversational(project)

    for row in _stream(sql, params):
        (comparison_id, round_number, text, messages, text_a, source_a, text_b, source_b,
         votes_a, votes_b, votes_tie, votes_both_bad, mean_strength,
         adjudicated, ds_choice, ds_confidence) = row  # fmt: skip
        counts = {"a": votes_a, "b": votes_b, "tie": votes_tie, "both_bad": votes_both_bad}
        total = sum(counts.values())
        if adjudicated:
            choice, confidence, label_source = adjudicated, 1.0, "adjudicated"
        else:
            if total == 0:
                continue
            top = max(counts.values())
            leaders = [name for name in CHOICES if counts[name] == top]
            if len(leaders) > 1:
                continue
            choice, confidence, label_source = leaders[0], top / total, "majority"
        if confidence < filters.min_confidence:
            continue
        if choice in ("tie", "both_bad") and not filters.include_ties:
            continue
        a_wins = choice != "b"  # ties keep the imported order; `label` says what it was
        chosen, rejected = (text_a, text_b) if a_wins else (text_b, text_a)
        if isinstance(messages, str):  # SQLite hands JSON back as text
            messages = json.loads(messages)
        prompt: Any = messages if messages is not None else text
        if conversational:
            prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            chosen = [{"role": "assistant", "content": chosen}]
            rejected = [{"role": "assistant", "content": rejected}]
        yield {
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "comparison_id": comparison_id,
            "label": choice,
            "label_source": label_source,
            "votes_chosen": counts["a" if a_wins else "b"],
            "votes_rejected": counts["b" if a_wins else "a"],
            "votes_tie": votes_tie,
            "votes_both_bad": votes_both_bad,
            "agreement": max(counts.values()) / total if total else None,
            "confidence": confidence,
            "ds_confidence": ds_confidence if ds_choice == choice else None,
            "mean_strength": float(mean_strength) if mean_strength is not None else None,
            "round": round_number,
            "source_chosen": source_a if a_wins else source_b,
            "source_rejected": source_b if a_wins else source_a,
        }


def _conversational(project: Project) -> bool:
    """Arrow needs one type per column: if any prompt is a conversation, every row is written in
    TRL's conversational format (messages for prompt, chosen and rejected)."""
    return Prompt.objects.filter(project=project, messages__isnull=False).exists()


def preference_schema(project: Project) -> pa.Schema:
    text = _MESSAGES if _conversational(project) else pa.string()
    return pa.schema(
        [
            ("prompt", text),
            ("chosen", text),
            ("rejected", text),
            ("comparison_id", pa.int64()),
            ("label", pa.string()),
            ("label_source", pa.string()),
            ("votes_chosen", pa.int64()),
            ("votes_rejected", pa.int64()),
            ("votes_tie", pa.int64()),
            ("votes_both_bad", pa.int64()),
            ("agreement", pa.float64()),
            ("confidence", pa.float64()),
            ("ds_confidence", pa.float64()),
            ("mean_strength", pa.float64()),
            ("round", pa.int64()),
            ("source_chosen", pa.string()),
            ("source_rejected", pa.string()),
        ]  # fmt: skip
    )


def kto_rows(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """TRL's unpaired format, which its KTOTrainer reads: a preference row's chosen answer is a
    desirable completion (label true), its rejected one undesirable; both answers of a both-bad
    comparison are undesirable, and a tie says nothing about either."""
    for row in rows:
        if row["label"] == "tie":
            continue
        for side, desirable in (("chosen", row["label"] != "both_bad"), ("rejected", False)):
            yield {
                "prompt": row["prompt"],
                "completion": row[side],
                "label": desirable,
                "comparison_id": row["comparison_id"],
                "label_source": row["label_source"],
                "confidence": row["confidence"],
                "round": row["round"],
                "source": row[f"source_{side}"],
            }


def kto_schema(project: Project) -> pa.Schema:
    text = _MESSAGES if _conversational(project) else pa.string()
    return pa.schema(
        [
            ("prompt", text),
            ("completion", text),
            ("label", pa.bool_()),
            ("comparison_id", pa.int64()),
            ("label_source", pa.string()),
            ("confidence", pa.float64()),
            ("round", pa.int64()),
            ("source", pa.string()),
        ]  # fmt: skip
    )


_VOTES_SQL = """
SELECT v.id, v.comparison_id, v.labeler_id, v.choice, v.strength, v.winner_id, v.shown_left_id,
       c.response_a_id, v.rationale, v.flags, v.time_spent_ms, v.created_at, c.round, v.source
FROM annotation_vote v JOIN annotation_comparison c ON c.id = v.comparison_id
WHERE c.project_id = %s {round_filter}
ORDER BY c.id, v.id
"""

VOTE_SCHEMA = pa.schema(
    [
        ("vote_id", pa.int64()),
        ("comparison_id", pa.int64()),
        ("labeler", pa.string()),
        ("choice", pa.string()),
        ("strength", pa.int64()),
        ("shown_left", pa.string()),
        ("rationale", pa.string()),
        ("flags", pa.list_(pa.string())),
        ("time_spent_ms", pa.int64()),
        ("created_at", pa.string()),
        ("round", pa.int64()),
        ("source", pa.string()),
    ]  # fmt: skip
)


@functools.lru_cache(maxsize=100_000)
def pseudonym(labeler_id: int) -> str:
    """Stable per installation, not reversible without the SECRET_KEY."""
    digest = hmac.new(str(settings.SECRET_KEY).encode(), f"labeler:{labeler_id}".encode(), hashlib.sha256)
    return digest.hexdigest()[:16]


def vote_rows(
    project: Project, *, round_number: int | None = None, pseudonymize: bool = True, source: str | None = None
) -> Iterator[dict]:
    """Every vote (of one source when asked), with the source it came from."""
    params: list[Any] = [project.pk]
    conditions = ""
    if round_number is not None:
        conditions, params = "AND c.round = %s", [*params, round_number]
    if source not in (None, "all"):
        conditions, params = conditions + " AND v.source = %s", [*params, source]
    for row in _stream(_VOTES_SQL.format(round_filter=conditions), params):
        (vote_id, comparison_id, labeler_id, choice, strength, _winner, shown_left, response_a,
         rationale, flags, time_spent_ms, created_at, round_value, source) = row  # fmt: skip
        yield {
            "vote_id": vote_id,
            "comparison_id": comparison_id,
            "labeler": pseudonym(labeler_id) if pseudonymize else str(labeler_id),
            "choice": choice,
            "strength": strength,
            "shown_left": "a" if shown_left == response_a else "b",
            "rationale": rationale,
            "flags": json.loads(flags) if isinstance(flags, str) else flags,
            "time_spent_ms": time_spent_ms,
            "created_at": created_at.isoformat() if hasattr(created_at, "isoformat") else str(created_at),
            "round": round_value,
            "source": source,
        }


def encode_jsonl(rows: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    buffer: list[str] = []
    size = FIRST_BATCH_ROWS
    for row in rows:
        buffer.append(json.dumps(row, ensure_ascii=False))
        if len(buffer) >= size:
            yield ("\n".join(buffer) + "\n").encode()
            buffer, size = [], BATCH_ROWS
    if buffer:
        yield ("\n".join(buffer) + "\n").encode()


class _Drain:
    """A write-only file for ParquetWriter whose bytes are handed on after each row group."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.position = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def encode_parquet(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> Iterator[bytes]:
    sink = _Drain()
    writer = pq.ParquetWriter(sink, schema)
    batch: list[dict[str, Any]] = []
    size = FIRST_BATCH_ROWS
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            batch, size = [], BATCH_ROWS
            yield sink.take()
    if batch:
        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    writer.close()
    yield sink.take()


def export_stream(
    project: Project,
    *,
    file_format: Format,
    votes: bool = False,
    kto: bool = False,
    filters: PreferenceFilters | None = None,
    pseudonymize: bool = True,
) -> Iterator[bytes]:
    """Bytes of the whole export, a batch at a time: preference pairs, KTO's unpaired rows
    (`kto`) or raw votes (`votes`)."""
    filters = filters or PreferenceFilters()
    if votes:
        rows = vote_rows(project, round_number=filters.round, pseudonymize=pseudonymize, source=filters.source)
        schema = VOTE_SCHEMA
    elif kto:
        rows, schema = kto_rows(preference_rows(project, filters)), kto_schema(project)
    else:
        rows = preference_rows(project, filters)
        schema = preference_schema(project)
    return encode_jsonl(rows) if file_format == "jsonl" else encode_parquet(rows, schema)
