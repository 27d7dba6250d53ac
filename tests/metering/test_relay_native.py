"""The C step (``metering/_relay.c``) against the Python it stands in for.

It must answer what ``usage_in`` and the reference pricing answer, or
``NotImplemented`` (the reference then decides); and for vLLM's own spelling
of an answer it must answer, or the fast path would never run.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.meter import RequestContext
from gateway.schemas import Endpoint
from metering import native
from metering.usage import MODEL_KEYS, TokenUsage, usage_in
from router.table import Decision

pytestmark = pytest.mark.skipif(native.relay is None, reason="metering._relay not built")

MODEL = "m1"
RATIO = (7, 3)  # nano-dollars per micro-GPU-second, as a tariff keeps them


def relay_c(body: bytes) -> Any:
    ctx = RequestContext("req-1", "t1", Endpoint.CHAT, Decision("small", MODEL, True, "r", 0.2))
    ctx.bill.gpu_seconds = 0.5
    assert native.relay is not None
    return native.relay(
        body, MODEL_KEYS[MODEL], ctx, ctx.decision, "http://r", "chat", RATIO, RATIO,
        time.monotonic(), None,
    )  # fmt: skip


def body_with(usage_text: str, model: str = MODEL) -> bytes:
    head = f'{{"id":"c","object":"chat.completion","model":{json.dumps(model)},"choices":[],'
    return (head + '"usage":' + usage_text + ',"prompt_logprobs":null}').encode()


def agrees(body: bytes) -> Any:
    """The C answer, checked against the reference's reading of the same bytes."""
    result = relay_c(body)
    if result is NotImplemented:
        return result
    expected = usage_in(body, MODEL)
    if result is None:
        assert expected is None
    else:
        assert expected is not None
        assert result[0].usage == expected
    return result


COUNT = st.integers(0, 10**12)
VALUE = st.one_of(
    COUNT,
    st.integers(-(10**20), 10**20),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
DETAILS = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["cached_tokens", "audio_tokens", "x"]), VALUE, max_size=3),
    VALUE,
)
KEYS = ["prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details", "other"]


@st.composite
def usage_texts(draw: st.DrawFn) -> str:
    """A usage object in any order and spacing, with any kinds of values, at times repeated
    keys or a key with an escape."""
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=6))
    parts = []
    for key in keys:
        value = draw(DETAILS if key == "prompt_tokens_details" else VALUE)
        name = json.dumps(key) if not draw(st.booleans()) else '"prompt\\u005ftokens"'
        space = draw(st.sampled_from(["", " ", "\n  "]))
        parts.append(f"{space}{name}{space}:{space}{json.dumps(value)}")
    return "{" + ",".join(parts) + draw(st.sampled_from(["", " "])) + "}"


@given(usage_texts())
def test_any_usage_object_is_read_as_the_reference_reads_it_or_left_to_it(text: str) -> None:
    agrees(body_with(text))


@given(
    prompt=COUNT,
    completion=COUNT,
    cached=st.none() | COUNT,
    details=st.booleans(),
    spaced=st.booleans(),
)
def test_vllms_own_spelling_is_always_read_in_c(
    prompt: int, completion: int, cached: int | None, details: bool, spaced: bool
) -> None:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached} if details else None,
    }
    text = json.dumps(usage) if spaced else orjson.dumps(usage).decode()
    result = agrees(body_with(text))
    assert result is not NotImplemented
    assert result[0].usage == TokenUsage(prompt, completion, (cached or 0) if details else 0)


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        (body_with('{"prompt_tokens":1,"completion_tokens":2}', model="m2"), None),
        (body_with('{"prompt_tokens":1,"completion_tokens":2}', model="m10"), None),
        (b'{"model":"m1","choices":[]}', None),
        (b"", None),
        (b'"usage":', None),  # no model key
        (body_with("null"), NotImplemented),
        (body_with('{"prompt_tokens":1}'), NotImplemented),
        (body_with('{"prompt_tokens":1.0,"completion_tokens":2}'), NotImplemented),
        (body_with('{"prompt_tokens":01,"completion_tokens":2}'), NotImplemented),
        (body_with('{"prompt_tokens":1,"completion_tokens":2'), NotImplemented),
        (body_with('{"prompt_tokens":-1,"completion_tokens":2}'), NotImplemented),
        # a brace inside a key: the reference's brace count reads it as structure
        (
            body_with('{"prompt_tokens":1,"completion_tokens":2,"d":{"ca}hed_tokens":4}}'),
            NotImplemented,
        ),
        (body_with('{"prompt_tokens":1,"completion_tokens":2,"{x":3}'), NotImplemented),
    ],
)
def test_what_c_leaves_alone(body: bytes, answer: Any) -> None:
    assert agrees(body) is answer


def test_the_last_usage_key_counts_as_in_the_reference() -> None:
    content = 'a \\"usage\\":{\\"prompt_tokens\\":9,\\"completion_tokens\\":9}'
    body = body_with('{"prompt_tokens":1,"completion_tokens":2}').replace(
        b'"choices":[]', f'"choices":[{{"text":"{content}"}}]'.encode()
    )
    assert agrees(body)[0].usage == TokenUsage(1, 2)


def test_the_log_keeps_what_it_is_given_until_taken() -> None:
    assert native.record_log is not None
    log = native.record_log()
    ctx = RequestContext("req-9", "t1", Endpoint.CHAT, Decision("small", MODEL, True, "r", 0.2))
    ctx.bill.gpu_seconds, ctx.bill.attempts = 1.5, 2
    body = body_with('{"prompt_tokens":3,"completion_tokens":4}')
    assert native.relay is not None
    for _ in range(300):  # past the log's first capacity
        report, lines = native.relay(
            body, MODEL_KEYS[MODEL], ctx, ctx.decision, "u", "chat", (1, 1), (2, 1), 5.0, log
        )
        assert report is None
        assert lines.startswith(b"x-tollway-request-id: req-9\r\n")
    assert len(log) == 300
    taken = log.take()
    assert len(log) == 0
    assert log.take() == []
    assert len(taken) == 300
    first = taken[0]
    assert first.usage == TokenUsage(3, 4, 0)
    assert (first.request_id, first.gpu_us, first.attempts, first.replica) == (
        "req-9", 1_500_000, 2, "u",
    )  # fmt: skip
    assert (first.cost.marginal_nanos, first.cost.loaded_nanos) == (1_500_000, 3_000_000)
    assert first.duration_s == 5.0 - ctx.started
    assert first.ttft_s is None


PUNCTUATION = b'{}:,"0123456789 -n\\ul'


def test_mutated_answers_are_read_as_the_reference_reads_them_or_left_to_it() -> None:
    rng = random.Random(7)
    base = body_with(
        '{"prompt_tokens":12,"total_tokens":28,"completion_tokens":16,'
        '"prompt_tokens_details":{"cached_tokens":4}}'
    )
    for _ in range(20000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = (
                rng.choice(PUNCTUATION) if rng.random() < 0.7 else rng.randrange(256)
            )
        agrees(bytes(data[: rng.randint(0, len(data))]))
