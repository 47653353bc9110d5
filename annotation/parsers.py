"""The API's JSON parser: DRF's, answering 400 for a body nested too deeply to parse, where the
json module raises RecursionError (a 500 otherwise). The body is already held to Django's
DATA_UPLOAD_MAX_MEMORY_SIZE: DRF reads JSON through `request.body`, which checks it."""

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None
