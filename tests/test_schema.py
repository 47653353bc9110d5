"""The API's documented contract is the real one: schemathesis generates requests from the OpenAPI
schema (valid ones and invalid ones), sends them to a real HTTP server as a labeler and as an
admin, and checks every answer against the schema: no 5xx, no status the schema does not list, and
bodies and content types as documented. A bounded run with a fixed seed, so that it fails the same
way on every machine."""

import pytest
import schemathesis
from django.contrib.auth.models import User
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from annotation import auth
from tests.factories import api_client_for, make_project

EXAMPLES = 20  # per operation, role and mode: about 600 requests, under a minute on 2 cores
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class Run:
    """Every answer seen, and every check that failed, with the request that caused it."""

    def __init__(self, base_url: str, real: dict[str, object]) -> None:
        self.base_url, self.real = base_url, real
        self.failures: list[str] = []
        self.statuses: set[tuple[str, int]] = set()

    def operation(self, operation, user: User, mode: GenerationMode) -> None:
        @given(case=operation.as_strategy(generation_mode=mode), real_ids=st.booleans())
        @settings(
            max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        def check(case, real_ids):
            # Half the requests name objects that exist, so that they get past the 404s.
            if real_ids and case.path_parameters:
                case.path_parameters = {
                    name: self.real.get(name, value) for name, value in case.path_parameters.items()
                }
            # A token per request: DELETE /auth/token/ revokes the one before.
            token = auth.token_issue(user=user).key
            response = case.call(base_url=self.base_url, headers={"Authorization": f"Token {token}"})
            self.statuses.add((operation.label, response.status_code))
            try:
                case.validate_response(response, checks=CHECKS)
            except FailureGroup as failure:  # every failure is collected and reported
                for problem in failure.exceptions:
                    self.failures.append(f"{operation.label} as {user.username} ({mode}): {problem}"[:1500])

        try:
            check()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE, f"{operation.label}: no valid request could be generated"
            # An operation without parameters or body has no invalid request to make.


@pytest.mark.django_db(transaction=True)
def test_the_api_answers_only_what_its_schema_documents(live_server, alice, admin_user):
    project = make_project(pairs=30, overlap=2)
    client = api_client_for(alice)
    assignment = client.post(f"/api/v1/projects/{project.slug}/assignments/").json()["assignment"]
    document = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    run = Run(live_server.url, {"slug": project.slug, "assignment_id": assignment})

    for result in schemathesis.openapi.from_dict(document).get_all_operations():
        for user in (alice, admin_user):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run.operation(result.ok(), user, mode)

    distinct = sorted(
        {failure.split(":", 1)[0] + ": " + failure.split("\n")[0].split(": ", 1)[1] for failure in run.failures}
    )
    assert not run.failures, f"{len(run.failures)} failures of {len(distinct)} kinds:\n" + "\n".join(distinct)
    # The run reached past authentication and validation into the operations themselves.
    succeeded = {label for label, code in run.statuses if code < 300}
    assert len(succeeded) >= 6, sorted(run.statuses)
