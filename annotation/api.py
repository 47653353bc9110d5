"""HTTP API (DRF): one view per operation, each with its own input and output serializer."""

from django.contrib.auth.models import User
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from annotation import selectors, services
from annotation.models import Assignment, Project, Vote


def _labeler(request: Request) -> User:
    labeler = selectors.labeler_or_none(request.user)
    if labeler is None:
        raise PermissionDenied("You are not in the labelers group.")
    return labeler


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
        labeler = _labeler(request)
        project = get_object_or_404(Project, slug=slug)
        assignment = services.assignment_claim(project=project, labeler=labeler)
        if assignment is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        assignment = selectors.assignment_for_display(assignment_id=assignment.pk)
        return Response(self.OutputSerializer(assignment).data, status=status.HTTP_201_CREATED)


class VoteAPI(APIView):
    @extend_schema_serializer(component_name="VoteInput")
    class InputSerializer(serializers.Serializer):
        choice = serializers.ChoiceField(choices=list(services.SCREEN_CHOICES))
        strength = serializers.IntegerField(min_value=1, max_value=3, default=1)
        rationale = serializers.CharField(allow_blank=True, default="", max_length=5000)
        flags = serializers.ListField(child=serializers.ChoiceField(choices=Vote.Flag.values), default=list)
        time_spent_ms = serializers.IntegerField(min_value=0, max_value=services.MAX_TIME_SPENT_MS, required=False)

    @extend_schema_serializer(component_name="Vote")
    class OutputSerializer(serializers.Serializer):
        vote = serializers.IntegerField(source="pk")
        assignment = serializers.IntegerField(source="assignment_id")
        choice = serializers.CharField(help_text="Canonical: a, b, tie or both_bad.")
        strength = serializers.IntegerField()
        created_at = serializers.DateTimeField()

    @extend_schema(
        operation_id="vote_submit",
        request=InputSerializer,
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                location=OpenApiParameter.HEADER,
                required=False,
                description="Retrying with the same key returns the first vote instead of adding one.",
            )
        ],
        responses={
            201: OutputSerializer,
            200: OpenApiResponse(OutputSerializer, description="Replay of an earlier request with the same key."),
            400: OpenApiResponse(description="A field is invalid; the body names it."),
            404: ErrorSerializer,
            409: ErrorSerializer,
        },
    )
    def post(self, request: Request, assignment_id: int) -> Response:
        labeler = _labeler(request)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key = request.headers.get("Idempotency-Key", "").strip() or None
        if key is not None and len(key) > 200:
            return Response({"Idempotency-Key": ["at most 200 characters"]}, status=status.HTTP_400_BAD_REQUEST)
        try:
            vote, created = services.vote_submit(
                assignment_id=assignment_id, labeler=labeler, idempotency_key=key, **data.validated_data
            )
        except Assignment.DoesNotExist:
            raise NotFound("No such assignment for you.") from None
        except services.InvalidVote as error:
            return Response({error.field: [str(error)]}, status=status.HTTP_400_BAD_REQUEST)
        except services.LabelingError as error:
            return Response({"detail": str(error)}, status=status.HTTP_409_CONFLICT)
        return Response(
            self.OutputSerializer(vote).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


class TokenAPI(ObtainAuthToken):
    """`{"username", "password"}` in, `{"token"}` out. No session: a browser cookie must not turn
    this into a CSRF-checked call."""

    authentication_classes: list = []
