"""Every error is OpenAI-shaped with the right status; no traceback reaches a client."""

from __future__ import annotations

from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import KEY, Stack, set_faults, sim_stats

CHAT: dict[str, Any] = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}


def post(
    stack: Stack,
    body: bytes | dict[str, Any],
    *,
    key: str | None = KEY,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    all_headers = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        all_headers["authorization"] = f"Bearer {key}"
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(stack.gateway.url + path, headers=all_headers, timeout=30, **kwargs)


def assert_openai_error(
    response: httpx.Response, status: int, type_: str, code: str | None, param: str | None = None
) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (type_, code, param)
    assert "Traceback" not in response.text
    assert response.headers["x-request-id"]
    message: str = error["message"]
    return message


def test_malformed_json_is_400(stack: Stack) -> None:
    message = assert_openai_error(
        post(stack, b'{"model": "sim-small",'), 400, "invalid_request_error", "invalid_json"
    )
    assert "could not parse the JSON body" in message


def test_empty_body_is_400(stack: Stack) -> None:
    assert_openai_error(post(stack, b""), 400, "invalid_request_error", None)


def test_schema_violation_names_the_field(stack: Stack) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "x"}, {"role": "wizard"}]}
    message = assert_openai_error(
        post(stack, body), 400, "invalid_request_error", "invalid_value", "messages[1].role"
    )
    assert "messages[1].role" in message


def test_missing_key_is_401(stack: Stack) -> None:
    assert_openai_error(post(stack, CHAT, key=None), 401, "authentication_error", "invalid_api_key")


def test_wrong_key_is_401_via_sdk(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        stack.client(key="sk-not-a-real-key").chat.completions.create(**CHAT)
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    assert sum(sim_stats(s)["requests_received_total"] for s in stack.sims) == 0


def test_models_needs_a_key(stack: Stack) -> None:
    response = httpx.get(stack.gateway.url + "/v1/models", timeout=10)
    assert_openai_error(response, 401, "authentication_error", "invalid_api_key")


def test_unknown_model_is_404_via_sdk(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        stack.client().chat.completions.create(model="gpt-9", messages=CHAT["messages"])
    assert err.value.code == "model_not_found"
    assert err.value.param == "model"
    assert "gpt-9" in err.value.message


def test_body_over_limit_is_413(stack: Stack) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (70 * 1024)}]}
    assert_openai_error(post(stack, big), 413, "invalid_request_error", "payload_too_large")


def test_chunked_body_over_limit_is_413(stack: Stack) -> None:
    def chunks() -> Any:
        yield b'{"model": "sim-small", "messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}]}'

    response = httpx.post(
        stack.gateway.url + "/v1/chat/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
        timeout=30,
    )
    assert_openai_error(response, 413, "invalid_request_error", "payload_too_large")


def test_unknown_route_and_method(stack: Stack) -> None:
    assert_openai_error(
        httpx.get(stack.gateway.url + "/v1/nothing", timeout=10),
        404,
        "invalid_request_error",
        "not_found",
    )
    assert_openai_error(
        httpx.get(stack.gateway.url + "/v1/chat/completions", timeout=10),
        405,
        "invalid_request_error",
        "method_not_allowed",
    )


def test_vllm_client_error_is_relayed_in_openai_shape(stack: Stack) -> None:
    body = {**CHAT, "max_tokens": 10_000_000}  # over the simulator's max_model_len
    response = post(stack, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "maximum context length" in error["message"] or "max" in error["message"]


def test_upstream_5xx_after_retries_is_502(stack: Stack) -> None:
    set_faults(stack.small, error_rate=1.0, error_status=500)
    response = post(stack, CHAT)
    message = assert_openai_error(response, 502, "server_error", "upstream_error")
    assert stack.small.url in message
    assert sim_stats(stack.small)["requests_failed"] == 1  # 500 is not retried
