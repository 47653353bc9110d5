"""The statements behind claiming and voting. No Django here, so the load benchmark's ceiling runs
exactly these through psycopg. Parameters are named (%(name)s, passed as a dict; psycopg and
Django's SQLite backend both take them); `{...}` fields are filled by the caller (row-lock clauses
exist on PostgreSQL only; SQLite runs the rest as it is).

They are hand-written rather than ORM chains because they run on every labeling request, and at
hundreds of votes a second the ORM's own CPU was the bottleneck (bench/labeling_load.py).
"""

LIVE_LEASES = """
    SELECT COUNT(*) FROM annotation_assignment l
    WHERE l.comparison_id = {comparison} AND l.status = 'open' AND l.expires_at > %(now)s
"""

# Renewing takes no comparison lock, so whether the lease is still live is decided by the clock
# at execution ({clock}: the database's own on PostgreSQL), never by a time read before: a lease
# that expired meanwhile may already have been handed to someone else.
RENEW_CURRENT_LEASE = """
    UPDATE annotation_assignment SET expires_at = %(expires_at)s
    WHERE labeler_id = %(labeler)s AND status = 'open' AND expires_at > {clock}
      AND comparison_id IN (SELECT id FROM annotation_comparison WHERE project_id = %(project)s)
    RETURNING id
"""
POSTGRESQL_CLOCK = "GREATEST(%(now)s, clock_timestamp())"
CALLER_CLOCK = "%(now)s"  # elsewhere (SQLite, one process): the time the caller read

CANDIDATE = (
    """
    SELECT c.id, c.vote_count FROM annotation_comparison c
    WHERE c.project_id = %(project)s AND c.vote_count < %(overlap)s AND c.origin <> 'gold' {passed_over}
      AND c.vote_count + ("""
    + LIVE_LEASES.format(comparison="c.id")
    + """) < %(overlap)s
      AND c.id NOT IN (
        SELECT d.comparison_id FROM annotation_assignment d
        WHERE d.labeler_id = %(labeler)s AND d.status IN ('voted', 'skipped'))
    ORDER BY c.vote_count DESC, c.id
    LIMIT 1 {lock}
"""
)
# NOT IN rather than NOT EXISTS: PostgreSQL reads the labeler's done comparisons once, into a hash,
# from the index assignment_done_by_labeler, instead of probing once per comparison it passes over.
# A labeler who voted on the 50,000 partial comparisons that sort first took 500 ms a claim that way
# (every one passed over also ran the live-lease count); 1/20 of that hashed (bench/results/
# labeling_load_1m_plans.txt). The hash must fit in work_mem * hash_mem_multiplier (8 MB by default:
# some 150,000 done comparisons of one labeler in one project), or the plan degrades.


def passed_over(comparison_ids: list[int]) -> tuple[str, dict[str, int]]:
    """CANDIDATE's `{passed_over}` clause leaving out these comparisons, and its parameters."""
    names = [f"passed_over_{index}" for index in range(len(comparison_ids))]
    clause = f"AND c.id NOT IN ({', '.join(f'%({name})s' for name in names)})" if names else ""
    return clause, dict(zip(names, comparison_ids, strict=True))


GOLD_CANDIDATE = """
    SELECT c.id FROM annotation_comparison c
    WHERE c.project_id = %(project)s AND c.origin = 'gold'
      AND NOT EXISTS (
        SELECT 1 FROM annotation_assignment d
        WHERE d.comparison_id = c.id AND d.labeler_id = %(labeler)s AND d.status IN ('voted', 'skipped'))
    ORDER BY RANDOM() LIMIT 1
"""

# A new statement sees leases committed after the candidate query's snapshot; holding the
# comparison's row lock, nobody can add one now, so this check is final.
LEASE_IF_ROOM = (
    """
    INSERT INTO annotation_assignment (comparison_id, labeler_id, status, left_is_a, created_at, expires_at)
    SELECT %(comparison)s, %(labeler)s, 'open', %(left_is_a)s, %(now)s, %(expires_at)s
    WHERE %(vote_count)s + ("""
    + LIVE_LEASES.format(comparison="%(comparison)s")
    + """) < %(overlap)s
    ON CONFLICT (comparison_id, labeler_id) DO UPDATE SET
        status = 'open', left_is_a = excluded.left_is_a, created_at = excluded.created_at,
        expires_at = excluded.expires_at
    RETURNING id
"""
)

# Every change to a comparison's votes and leases happens under its row lock (claims take it too).
# The assignment is locked as well, after the comparison as claims do: a vote that waited for the
# lock then reads the assignment as the vote before it left it (voted), not as it was when the
# statement began, and is refused instead of inserting a second vote.
VOTE_LOCK = "FOR UPDATE OF c, a"

LOCK_FOR_VOTE = """
    SELECT a.id, a.status, a.expires_at, a.left_is_a, a.created_at,
           c.id, c.response_a_id, c.response_b_id, c.vote_count, c.origin, c.project_id, p.overlap, p.ai_votes
    FROM annotation_assignment a
    JOIN annotation_comparison c ON c.id = a.comparison_id
    JOIN annotation_project p ON p.id = c.project_id
    WHERE a.id = %(assignment)s AND a.labeler_id = %(labeler)s
    {lock}
"""

# The live leases on a comparison other than this assignment's own.
OTHER_LIVE_LEASES = LIVE_LEASES.format(comparison="%(comparison)s") + " AND l.id <> %(assignment)s"

# Parameters named as the columns they fill. No row comes back when a unique constraint refuses
# the vote (the labeler's idempotency key taken meanwhile), so the caller can answer 409, not 500.
INSERT_VOTE = """
    INSERT INTO annotation_vote (comparison_id, labeler_id, assignment_id, choice, winner_id, strength,
                                 shown_left_id, rationale, flags, time_spent_ms, idempotency_key, created_at,
                                 source, judgment)
    VALUES (%(comparison_id)s, %(labeler_id)s, %(assignment_id)s, %(choice)s, %(winner_id)s, %(strength)s,
            %(shown_left_id)s, %(rationale)s, %(flags)s, %(time_spent_ms)s, %(idempotency_key)s, %(created_at)s,
            %(source)s, %(judgment)s)
    ON CONFLICT DO NOTHING
    RETURNING id
"""

# An earlier vote with the labeler's idempotency key (annotation_vote's unique constraint on the two).
VOTE_BY_KEY = """
    SELECT id, assignment_id FROM annotation_vote
    WHERE labeler_id = %(labeler)s AND idempotency_key = %(idempotency_key)s
"""

COUNT_VOTE = "UPDATE annotation_comparison SET vote_count = vote_count + 1 WHERE id = %(comparison)s"

MARK_VOTED = "UPDATE annotation_assignment SET status = 'voted' WHERE id = %(assignment)s"
