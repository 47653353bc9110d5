"""HTTP API (DRF): one view per operation, each with its own input and output serializer."""

import itertools

from django.contrib.auth.models import User
from django.http import StreamingHttpResponse
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from annotation import auth, export, parsers, selectors, services
from annotation.auth import ExpiringTokenAuthentication
from annotation.models import Assignment, Project, Vote


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


class ClaimAPI(APIView):
    @extend_schema_serializer(component_name="Assignment")
    class OutputSerializer(serializers.Serializer):
        class SideSerializer(serializers.Serializer):
            text = serializers.CharField()

        assignment = serializers.IntegerField(source="pk")
        prompt = serializers.JSONField(source="comparison.prompt.content", help_text="A string or a list of messages.")
        left = SideSerializer()
        right = SideSerializer()
        expires_at = serializers.DateTimeField()

    @extend_schema(
        operation_id="assignment_claim",
        request=None,
        responses={
            201: OutputSerializer,
            204: OpenApiResponse(description="Nothing is left for this labeler in the project."),
            403: ErrorSerializer,
            404: ErrorSerializer,
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        labeler = selectors.labeler_required(request.user)
        project = selectors.project_for_labeler(user=labeler, slug=slug)
        claimed = claim_answer(labeler=labeler, project=project)
        if claimed is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        return Response(claimed, status=status.HTTP_201_CREATED)


# The answers of claims and votes are built by hand, field for field as their OutputSerializer
# (which stays the schema's source: tests/test_api.py holds the two equal): a serializer's own
# CPU was a noticeable share of these requests'. Datetimes go through DRF's own field.
_DATETIME = serializers.DateTimeField()


def claim_answer(*, labeler: User, project: Project) -> dict | None:
    """The claim's answer: the next assignment as ClaimAPI shows it, or None when nothing is left.
    A vote's `?next=1` answers with the same."""
    assignment = services.assignment_claim(project=project, labeler=labeler)
    return None if assignment is None else assignment_answer(assignment)


def assignment_answer(assignment: Assignment) -> dict:
    """ClaimAPI.OutputSerializer(assignment).data."""
    return {
        "assignment": assignment.pk,
        "prompt": assignment.comparison.prompt.content,
        "left": {"text": assignment.left.text},
        "right": {"text": assignment.right.text},
        "expires_at": _DATETIME.to_representation(assignment.expires_at),
    }


def vote_answer(vote: Vote) -> dict:
    """VoteAPI.OutputSerializer(vote).data."""
    return {
        "vote": vote.pk,
        "assignment": vote.assignment_id,
        "choice": vote.choice,
        "strength": vote.strength,
        "source": vote.source,
        "created_at": _DATETIME.to_representation(vote.created_at),
    }


class VoteAPI(APIView):
    @extend_schema_serializer(component_name="VoteInput")
    class InputSerializer(serializers.Serializer):
        choice = serializers.ChoiceField(choices=list(services.SCREEN_CHOICES))
        strength = serializers.IntegerField(min_value=1, max_value=3, default=1)
        rationale = serializers.CharField(allow_blank=True, default="", max_length=services.MAX_RATIONALE_LENGTH)
        flags = serializers.ListField(child=serializers.ChoiceField(choices=Vote.Flag.values), default=list)
        time_spent_ms = serializers.IntegerField(min_value=0, max_value=services.MAX_TIME_SPENT_MS, required=False)
        judgment = serializers.DictField(
            required=False, help_text="AI labelers only, and required of them: the judge's record of its verdict."
        )

    class QuerySerializer(serializers.Serializer):
        next = serializers.BooleanField(
            default=False, help_text="Claim the next assignment too and answer it as `next`: one round trip a vote."
        )

    class OutputSerializer(serializers.Serializer):
        vote = serializers.IntegerField(source="pk")
        assignment = serializers.IntegerField(source="assignment_id")
        choice = serializers.CharField(help_text="Canonical: a, b, tie or both_bad.")
        strength = serializers.IntegerField()
        source = serializers.CharField(help_text="human or ai: the account's kind.")  # type: ignore[assignment]  # a field named like Field.source
        created_at = serializers.DateTimeField()

    # The schema's view of the answer: `next` is there only when asked for, which a serializer
    # field cannot express at run time (a missing nullable field serializes as null), so the view
    # adds it to the vote's own fields.
    @extend_schema_serializer(component_name="Vote")
    class AnswerSerializer(OutputSerializer):
        next = ClaimAPI.OutputSerializer(
            required=False,
            allow_null=True,
            help_text="Only with `?next=1`: the next assignment, as the claim answers it (renewed if you "
            "already hold one), or null when nothing is left for you.",
        )

    @extend_schema(
        operation_id="vote_submit",
        request=InputSerializer,
        parameters=[
            QuerySerializer,
            OpenApiParameter(
                "Idempotency-Key",
                location=OpenApiParameter.HEADER,
                required=False,
                description="Retrying with the same key returns the first vote instead of adding one.",
            ),
        ],
        responses={
            201: AnswerSerializer,
            200: OpenApiResponse(AnswerSerializer, description="Replay of an earlier request with the same key."),
            400: OpenApiResponse(description="A field is invalid; the body names it."),
            404: ErrorSerializer,
            409: ErrorSerializer,
        },
    )
    def post(self, request: Request, assignment_id: int) -> Response:
        labeler = selectors.labeler_required(request.user)
        query = vote_query(request.query_params)
        data = vote_input(request.data)
        key = request.headers.get("Idempotency-Key", "").strip() or None
        try:
            vote, created = services.vote_submit(
                assignment_id=assignment_id, labeler=labeler, idempotency_key=key, **data
            )
        except Assignment.DoesNotExist:
            raise NotFound("No such assignment for you.") from None
        except services.InvalidVote as error:
            field = "Idempotency-Key" if error.field == "idempotency_key" else error.field
            return Response({field: [str(error)]}, status=status.HTTP_400_BAD_REQUEST)
        except services.LabelingError as error:
            return Response({"detail": str(error)}, status=status.HTTP_409_CONFLICT)
        answer = vote_answer(vote)
        if query["next"]:
            # Through the labeler's visible projects, as a claim by slug is: one whose membership was
            # taken away since this lease has nothing left for them.
            project = selectors.project_for_labeler_or_none(user=labeler, project_id=vote.comparison.project_id)
            answer["next"] = None if project is None else claim_answer(labeler=labeler, project=project)
        return Response(answer, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


def vote_query(params: dict) -> dict:
    """VoteAPI.QuerySerializer's validated data; without a query string there is nothing to check."""
    if not params:
        return {"next": False}
    query = VoteAPI.QuerySerializer(data=params)
    query.is_valid(raise_exception=True)
    return query.validated_data


def vote_input(data: object) -> dict:
    """VoteAPI.InputSerializer's validated data. The common body, a choice and a strength (an int 1 to 3)
    and nothing else, is answered without building the serializer, as it would answer it; any other body
    goes through the serializer, which names what is wrong."""
    if type(data) is dict and data.keys() <= {"choice", "strength"} and data.get("choice") in services.SCREEN_CHOICES:
        strength = data.get("strength", 1)
        if type(strength) is int and 1 <= strength <= 3:
            return {"choice": data["choice"], "strength": strength, "rationale": "", "flags": []}
    serializer = VoteAPI.InputSerializer(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


class TokenRequestSerializer(AuthTokenSerializer):
    # No account has a longer name; checked before authentication, as the lock-out records keep
    # the name tried in a column of 255 characters.
    username = serializers.CharField(
        label="Username", write_only=True, max_length=User._meta.get_field("username").max_length
    )


class TokenAPI(ObtainAuthToken):
    """`{"username", "password"}` in, `{"token"}` out; `DELETE` with the token revokes it. No session:
    a browser cookie must not turn this into a CSRF-checked call."""

    authentication_classes = [ExpiringTokenAuthentication]
    serializer_class = TokenRequestSerializer
    parser_classes = [FormParser, MultiPartParser, parsers.JSONParser]

    def get_permissions(self) -> list[BasePermission]:
        return [IsAuthenticated()] if self.request.method == "DELETE" else []

    def get_serializer_context(self) -> dict:
        # django-axes counts failures and flags a lock-out on the Django request, which its middleware
        # answers with 429; DRF's wrapper would keep the flag where the middleware never looks.
        return {**super().get_serializer_context(), "request": self.request._request}

    @extend_schema(
        operation_id="auth_token_create",
        auth=[],
        responses={
            200: OpenApiResponse(description='`{"token"}`'),
            400: OpenApiResponse(description="Wrong username or password."),
            429: OpenApiResponse(description='Locked out: `{"detail", "retry_after_seconds"}`.'),
        },
    )
    def post(self, request: Request, *args: object, **kwargs: object) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        token = auth.token_issue(user=serializer.validated_data["user"])
        return Response({"token": token.key})

    @extend_schema(operation_id="auth_token_revoke", responses={204: None, 401: ErrorSerializer})
    def delete(self, request: Request) -> Response:
        # Only token authentication reaches here (authentication_classes), so request.auth is the token.
        auth.token_revoke(user=request.auth.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class AgreementAPI(APIView):
    class QuerySerializer(serializers.Serializer):
        round = serializers.IntegerField(min_value=0, required=False)

    @extend_schema(
        operation_id="agreement_get",
        parameters=[QuerySerializer],
        responses={
            200: OpenApiResponse(description="figures, labelers, labeler_pairs, computed_at"),
            403: ErrorSerializer,
        },
    )
    def get(self, request: Request, slug: str) -> Response:
        selectors.admin_required(request.user)
        project = get_object_or_404(Project, slug=slug)
        query = self.QuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        round_number = query.validated_data.get("round")
        snapshot = (
            services.snapshot_for_page(project=project)
            if round_number is None
            else selectors.latest_snapshot(project=project, round_number=round_number)
        )
        if snapshot is None:
            return Response({"computed_at": None, "figures": None, "labelers": [], "labeler_pairs": []})
        return Response(
            {
                "computed_at": snapshot.computed_at,
                "round": snapshot.round,
                "figures": snapshot.figures,
                "labelers": snapshot.labelers,
                "labeler_pairs": snapshot.labeler_pairs,
            }
        )


class ExportAPI(APIView):
    class QuerySerializer(serializers.Serializer):
        format = serializers.ChoiceField(choices=export.FORMATS, default="jsonl")
        kind = serializers.ChoiceField(choices=["preferences", "votes"], default="preferences")
        round = serializers.IntegerField(min_value=0, required=False)
        min_confidence = serializers.FloatField(min_value=0, max_value=1, default=0.0)
        include_ties = serializers.BooleanField(default=False)
        min_gold_accuracy = serializers.FloatField(min_value=0, max_value=1, required=False)
        pseudonymize = serializers.BooleanField(default=True)
        source = serializers.ChoiceField(  # type: ignore[assignment]  # a field named like Field.source
            choices=export.SOURCES,
            required=False,
            help_text="Whose votes make the labels: human, ai or all; by default the project's setting (ai_votes).",
        )

    @extend_schema(
        operation_id="export_get",
        parameters=[QuerySerializer],
        responses={
            (200, "application/jsonl"): OpenApiTypes.STR,
            (200, "application/vnd.apache.parquet"): OpenApiTypes.BINARY,
            403: ErrorSerializer,
        },
    )
    def get(self, request: Request, slug: str) -> StreamingHttpResponse:
        selectors.admin_required(request.user)
        project = get_object_or_404(Project, slug=slug)
        query = self.QuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        options = query.validated_data
        file_format = options["format"]
        stream = export.export_stream(
            project,
            file_format=file_format,
            votes=options["kind"] == "votes",
            filters=export.PreferenceFilters(
                round=options.get("round"),
                min_confidence=options["min_confidence"],
                include_ties=options["include_ties"],
                min_gold_accuracy=options.get("min_gold_accuracy"),
                source=options.get("source"),
            ),
            pseudonymize=options["pseudonymize"],
        )
        content_type = "application/jsonl" if file_format == "jsonl" else "application/vnd.apache.parquet"
        # The first batch is read before the answer starts, so that a database that cannot be reached
        # is a 503, not a 200 cut short. A failure later in the stream ends the body without its last
        # chunk, which HTTP clients report as an incomplete read.
        first = next(stream, b"")
        response = StreamingHttpResponse(itertools.chain([first], stream), content_type=content_type)
        response["Content-Disposition"] = f'attachment; filename="{project.slug}-{options["kind"]}.{file_format}"'
        return response


class ImportAPI(APIView):
    parser_classes = [MultiPartParser]

    class InputSerializer(serializers.Serializer):
        file = serializers.FileField(help_text="JSON Lines, as for `manage.py import_pairs`.")
        overlap = serializers.IntegerField(min_value=1, max_value=services.MAX_OVERLAP, required=False)
        skip_invalid = serializers.BooleanField(default=False)

    @extend_schema_serializer(component_name="ImportResult")
    class OutputSerializer(serializers.Serializer):
        created = serializers.IntegerField()
        duplicates = serializers.IntegerField()
        invalid_lines = serializers.ListField(child=serializers.CharField())

    @extend_schema(
        operation_id="pairs_import",
        request={"multipart/form-data": InputSerializer},
        responses={
            201: OutputSerializer,
            400: OpenApiResponse(description="`errors`: one per bad line, or the bad slug or overlap"),
            403: ErrorSerializer,
            413: OpenApiResponse(description="`errors`: the file is over FLYWHEEL_IMPORT_MAX_BYTES"),
        },
    )
    def post(self, request: Request, slug: str) -> Response:
        selectors.admin_required(request.user)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            _, result = services.pairs_import_upload(
                project_slug=slug,
                upload=data.validated_data["file"],
                overlap=data.validated_data.get("overlap"),
                skip_invalid=data.validated_data["skip_invalid"],
            )
        except services.ImportTooLarge as error:
            return Response({"errors": error.errors}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        except services.ImportRejected as error:
            return Response({"errors": error.errors}, status=status.HTTP_400_BAD_REQUEST)
        return Response(self.OutputSerializer(result).data, status=status.HTTP_201_CREATED)


class VotesAPI(APIView):
    """A labeler's votes in a project: labelers may read only their own, admins anyone's."""

    class QuerySerializer(serializers.Serializer):
        labeler = serializers.CharField(required=False, help_text="Username; default: yourself.")
        after = serializers.IntegerField(min_value=0, default=0, help_text="Votes after this vote id (`next`).")
        limit = serializers.IntegerField(min_value=1, max_value=1000, default=100)

    @extend_schema_serializer(component_name="VoteRecord")
    class OutputSerializer(serializers.Serializer):
        vote = serializers.IntegerField(source="pk")
        comparison = serializers.IntegerField(source="comparison_id")
        choice = serializers.CharField()
        strength = serializers.IntegerField()
        rationale = serializers.CharField()
        created_at = serializers.DateTimeField()

    @extend_schema_serializer(component_name="VotePage")
    class PageSerializer(serializers.Serializer):
        results = serializers.ListField(child=serializers.DictField())
        next = serializers.IntegerField(allow_null=True, help_text="Pass as `after` for the next page.")

    @extend_schema(
        operation_id="votes_list",
        parameters=[QuerySerializer],
        responses={200: PageSerializer, 403: ErrorSerializer, 404: ErrorSerializer},
    )
    def get(self, request: Request, slug: str) -> Response:
        user = selectors.labeler_required(request.user)
        project = selectors.project_for_labeler(user=user, slug=slug)
        query = self.QuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        username = query.validated_data.get("labeler", user.username)
        if username != user.username and selectors.admin_or_none(user) is None:
            raise PermissionDenied("Labelers can only see their own votes.")
        labeler = get_object_or_404(User, username=username)
        page = selectors.votes_for_labeler(
            project=project, labeler=labeler, after=query.validated_data["after"], limit=query.validated_data["limit"]
        )
        return Response({"results": self.OutputSerializer(page.votes, many=True).data, "next": page.next_after})
