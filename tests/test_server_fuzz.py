"""Schema fuzzing of the HTTP API (schemathesis over the app's own OpenAPI schema): never a 5xx."""

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings

from zeda_server.app import create_app
from zeda_server.engine import TorchEngine
from zeda_server.settings import ServerSettings


def test_no_operation_answers_5xx(small_student: Path) -> None:
    engine = TorchEngine(str(small_student), max_batch=8, max_queue=64)
    app = create_app(ServerSettings(model=str(small_student), max_tokens_cap=4), engine)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checked = []
    try:
        for result in schema.get_all_operations():
            operation = result.ok()

            @given(case=operation.as_strategy())
            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def no_server_error(case) -> None:
                response = case.call()
                assert response.status_code < 500, f"{case.method} {case.path}: {response.text[:500]}"

            no_server_error()
            checked.append(f"{operation.method.upper()} {operation.path}")
    finally:
        engine.shutdown()
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= set(checked)
