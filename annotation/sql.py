"""The statements behind claiming and voting. No Django here, so the load benchmark's ceiling runs
exactly these through psycopg. Parameters are positional (%s); `{...}` fields are filled by the
caller (row-lock clauses exist on PostgreSQL only; SQLite runs the rest as it is).

They are hand-written rather than ORM chains because they run on every labeling request, and at
hundreds of votes a second the ORM's own CPU was the bottleneck (bench/labeling_load.py).
"""

LIVE_LEASES = """
    SELECT COUNT(*) FROM annotation_assignment l
    WHERE l.comparison_id = {comparison} AND l.status = 'open' AND l.expires_at > %s
"""

# Renewing takes no comparison lock, so whether the lease is still live is decided by the clock
# at execution ({clock}: the database's own on PostgreSQL), never by a time read before: a lease
# that expired meanwhile may already have been handed to someone else.
RENEW_CURRENT_LEASE = """
    UPDATE annotation_assignment SET expires_at = %s
    WHERE labeler_id = %s AND status = 'open' AND expires_at > {clock}
      AND comparison_id IN (SELECT id FROM annotation_comparison WHERE project_id = %s)
    RETURNING id
"""
POSTGRESQL_CLOCK = "GREATEST(%s, clock_timestamp())"

CANDIDATE = (
    """
    SELECT c.id, c.vote_count FROM annotation_comparison c
    WHERE c.project_id = %s AND c.vote_count < %s AND c.origin <> 'gold' {passed_over}
      AND c.vote_count + ("""
    + LIVE_LEASES.format(comparison="c.id")
    + """) < %s
      AND NOT EXISTS (
        SELECT 1 FROM annotation_assignment d
        WHERE d.comparison_id = c.id AND d.labeler_id = %s AND d.status IN ('voted', 'skipped'))
    ORDER BY c.vote_count DESC, c.id
    LIMIT 1 {lock}
"""
)

GOLD_CANDIDATE = """
    SELECT c.id FROM annotation_comparison c
    WHERE c.project_id = %s AND c.origin = 'gold'
      AND NOT EXISTS (
        SELECT 1 FROM annotation_assignment d
        WHERE d.comparison_id = c.id AND d.labeler_id = %s AND d.status IN ('voted', 'skipped'))
    ORDER BY RANDOM() LIMIT 1
"""

# A new statement sees leases committed after the candidate query's snapshot; holding the
# comparison's row lock, nobody can add one now, so this check is final.
LEASE_IF_ROOM = (
    """
    INSERT INTO annotation_assignment (comparison_id, labeler_id, status, left_is_a, created_at, expires_at)
    SELECT %s, %s, 'open', %s, %s, %s
    WHERE %s + ("""
    + LIVE_LEASES.format(comparison="%s")
    + """) < %s
    ON CONFLICT (comparison_id, labeler_id) DO UPDATE SET
        status = 'open', left_is_a = excluded.left_is_a, created_at = excluded.created_at,
        expires_at = excluded.expires_at
    RETURNING id
"""
)

LOCK_FOR_VOTE = """
    SELECT a.id, a.status, a.expires_at, a.left_is_a, a.created_at,
           c.id, c.response_a_id, c.response_b_id, c.vote_count, c.origin, c.project_id, p.overlap
    FROM annotation_assignment a
    JOIN annotation_comparison c ON c.id = a.comparison_id
    JOIN annotation_project p ON p.id = c.project_id
    WHERE a.id = %s AND a.labeler_id = %s
    {lock}
"""

INSERT_VOTE = """
    INSERT INTO annotation_vote (comparison_id, labeler_id, assignment_id, choice, winner_id, strength,
                                 shown_left_id, rationale, flags, time_spent_ms, idempotency_key, created_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    RETURNING id
"""

COUNT_VOTE = "UPDATE annotation_comparison SET vote_count = vote_count + 1 WHERE id = %s"

MARK_VOTED = "UPDATE annotation_assignment SET status = 'voted' WHERE id = %s"
