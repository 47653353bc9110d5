"""The API's content negotiation: DRF's, with the common case answered without parsing anything.

Nearly every API request accepts anything (no Accept header, or `*/*`) or asks for JSON by name, and
the view's first renderer is JSON: DRF would parse the Accept header and rank it against each renderer
to reach the same (renderer, media type), which was a few per cent of a labeling request's CPU
(bench/labeling_load.py). Anything else (a list of types, parameters, another renderer first) goes
through DRF's negotiation unchanged.
"""

from collections.abc import Iterable
from typing import Any

from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request

JSON = "application/json"


class ContentNegotiation(DefaultContentNegotiation):
    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> Any:
        renderers = list(renderers)
        accept = request.META.get("HTTP_ACCEPT", "*/*")
        if format_suffix is None and accept in ("*/*", JSON) and renderers and renderers[0].media_type == JSON:
            return renderers[0], JSON
        return super().select_renderer(request, renderers, format_suffix)
