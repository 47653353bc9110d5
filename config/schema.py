"""The answers every API operation can give beside its own, added to the OpenAPI schema in one place
(drf-spectacular's postprocessing hook) so the documented contract is the real one: the schemathesis
run in tests/test_schema.py fails on any status the schema does not list."""

from typing import Any

from config.middleware import RETRY_AFTER_SECONDS

ERROR = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
FIELD_ERRORS = {
    "type": "object",
    "description": "Each bad field (or `errors`, one per bad import line) with what is wrong with it.",
    "additionalProperties": True,
}


def _json(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}


def _common(operation: dict[str, Any], path: str) -> dict[str, dict[str, Any]]:
    common = {
        "401": _json("No credentials, or a token that is unknown, revoked or expired.", ERROR),
        "500": _json("An unexpected error; the server logged it.", ERROR),
        "503": _json(
            "The database cannot be reached; try again after Retry-After seconds.",
            ERROR,
            headers={"Retry-After": {"schema": {"type": "integer", "example": RETRY_AFTER_SECONDS}}},
        ),  # fmt: skip
    }
    if "requestBody" in operation or any(parameter["in"] == "query" for parameter in operation.get("parameters", [])):
        common["400"] = _json("A parameter or field is invalid; the body names it.", FIELD_ERRORS)
    if "requestBody" in operation:
        common["413"] = _json("The body is over DATA_UPLOAD_MAX_MEMORY_SIZE (or, for imports, the import cap).", ERROR)
    if "{" in path:
        common["403"] = _json("The caller may not do this: a labeler where an admin is needed, or the reverse.", ERROR)
        common["404"] = _json("No such object, or none the caller may see.", ERROR)
    return common


def common_responses(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    for path, operations in result.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for code, response in _common(operation, path).items():
                responses.setdefault(code, response)
    return result
