"""Streams and whole completions, each made from the other.

A streamed miss is stored as the completion the stream adds up to
(``CompletionBuilder`` / ``completion_from_chunks``), so one entry serves both
kinds of request; a hit on a streaming request is replayed as the events vLLM
would have sent (``chunks_from_completion``).

Merging follows OpenAI's delta semantics (as the ``openai`` SDK's own
accumulator does): strings are concatenated (``content``, ``text``,
``reasoning_content``, ``function.arguments``, ``function.name``...), lists
are extended, and list entries carrying an ``index`` (``tool_calls``) are
merged into the entry with that index; ``id``, ``type``, ``role``,
``finish_reason`` and ``stop_reason`` are replaced, not concatenated. A null
never overwrites a value.

Pure: no I/O, no web framework.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
_DATA = b"data:"

CHAT_CHUNK = "chat.completion.chunk"
CHAT = "chat.completion"
TEXT = "text_completion"  # the object name of completions and of their chunks

_REPLACED = frozenset({"index", "id", "type", "role", "finish_reason", "stop_reason"})
# Chunk fields that are not the completion's own: framing, or the gateway's figures.
_NOT_COPIED = frozenset({"object", "choices", "usage", "tollway"})
_MESSAGE_OWN = frozenset({"role", "content", "tool_calls", "function_call"})
_CHOICE_OWN = frozenset({"index", "message", "text", "delta", "logprobs", "finish_reason"})


def event(chunk: Mapping[str, Any]) -> bytes:
    """One SSE ``data:`` event."""
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def chunk_of_event(raw: bytes) -> dict[str, Any] | None:
    """The JSON object in one SSE event; None for ``[DONE]``, comments and non-objects."""
    lines = [
        line[len(_DATA) :].removeprefix(b" ") for line in raw.split(b"\n") if line.startswith(_DATA)
    ]
    data = b"\n".join(lines)
    if not data.startswith(b"{"):
        return None
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return chunk if isinstance(chunk, dict) else None


def parse_events(body: bytes) -> list[dict[str, Any]]:
    """Every JSON chunk of a whole SSE body, in order."""
    events = body.replace(b"\r\n", b"\n").split(b"\n\n")
    return [chunk for raw in events if (chunk := chunk_of_event(raw)) is not None]


class CompletionBuilder:
    """Adds up a stream's chunks, one at a time, into the non-streaming completion.

    Keeps the running sums, not the chunks, and never modifies a chunk: the
    caller may go on to change it (the gateway rewrites ``model``, drops
    ``usage``) without touching the sums.
    """

    def __init__(self) -> None:
        self.chat: bool | None = None
        self.failed = False  # an error event was seen: the stream is not a completion
        self._top: dict[str, Any] = {}
        self._usage: dict[str, Any] | None = None
        self._messages: dict[int, dict[str, Any]] = {}
        self._choices: dict[int, dict[str, Any]] = {}

    def add_event(self, raw: bytes) -> None:
        """One SSE event as received; ``[DONE]`` and comments are ignored."""
        chunk = chunk_of_event(raw)
        if chunk is not None:
            self.add(chunk)

    def add(self, chunk: Mapping[str, Any]) -> None:
        if "error" in chunk or chunk.get("object") == "error":  # new and old vLLM
            self.failed = True
            return
        obj = chunk.get("object")
        if obj == CHAT_CHUNK:
            self.chat = True
        elif obj == TEXT:
            self.chat = False
        for name, value in chunk.items():
            if name not in _NOT_COPIED and value is not None:
                self._top[name] = value
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = dict(usage)
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("index"), int):
                continue
            index = choice["index"]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                if self.chat is None:
                    self.chat = True
                _merge(self._messages.setdefault(index, {}), delta)
            elif self.chat is None and "text" in choice:
                self.chat = False
            fields = {k: v for k, v in choice.items() if k != "delta"}
            _merge(self._choices.setdefault(index, {}), fields)

    def build(self) -> dict[str, Any] | None:
        """The completion, or None if the stream is not complete.

        Incomplete: an error event, no choices, a gap in the choice indexes, or
        a choice without a ``finish_reason``. A stream cut before any event of
        a later choice cannot be told from a shorter ``n``: store only streams
        that reached ``[DONE]``.
        """
        if self.failed or not self._choices:
            return None
        indexes = sorted(self._choices)
        if indexes != list(range(len(indexes))):
            return None
        if not all(self._choices[i].get("finish_reason") for i in indexes):
            return None
        chat = self.chat is not False
        choices = [self._choice(i, chat) for i in indexes]
        top = dict(self._top)
        completion = {
            "id": top.pop("id", None),
            "object": CHAT if chat else TEXT,
            "created": top.pop("created", None),
            "model": top.pop("model", None),
            "choices": choices,
            "usage": None if self._usage is None else dict(self._usage),
        }
        completion.update(top)
        return completion

    def _choice(self, index: int, chat: bool) -> dict[str, Any]:
        fields = dict(self._choices[index])
        fields.pop("index", None)
        out: dict[str, Any] = {"index": index}
        if chat:
            message = dict(self._messages.get(index, {}))
            calls = message.pop("tool_calls", None)
            out["message"] = {
                "role": message.pop("role", "assistant"),
                "content": message.pop("content", None),
                **message,
            }
            if calls:
                # The index orders deltas; a whole message's calls have none.
                out["message"]["tool_calls"] = [
                    {k: v for k, v in call.items() if k != "index"}
                    for call in sorted(calls, key=lambda call: call.get("index", 0))
                ]
        else:
            out["text"] = fields.pop("text", "")
        out["logprobs"] = fields.pop("logprobs", None)
        out["finish_reason"] = fields.pop("finish_reason")
        out.update(fields)
        return out


def completion_from_chunks(chunks: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The ``chat.completion`` or ``text_completion`` a stream's parsed chunks add up to.

    Content (or text) per choice in index order, the role, tool calls merged
    by index, the finish reason, id, created, model, and the usage of the
    last chunk that carried one (the final usage chunk, or with
    ``continuous_usage_stats`` the last chunk). None if the stream is incomplete.
    """
    builder = CompletionBuilder()
    for chunk in chunks:
        builder.add(chunk)
    return builder.build()


def chunks_from_completion(
    completion: Mapping[str, Any], *, include_usage: bool, chunk_chars: int = 32
) -> list[bytes]:
    """The SSE events vLLM would have streamed for ``completion``, ending with ``[DONE]``.

    Chat: a first chunk with ``{"role": "assistant", "content": ""}``
    (``content: null`` when the message had none, as OpenAI streams tool
    calls), then reasoning and content in pieces of ``chunk_chars``
    characters, then each tool call (id, type and name first, arguments in
    pieces), then a chunk with the finish reason, the logprobs and any other
    field of the message or choice. Completions: ``text`` pieces, then the
    finish reason. Choices are interleaved, one choice per event. With
    ``include_usage``, a last chunk ``{"choices": [], "usage": ...}``.
    """
    if chunk_chars < 1:
        raise ValueError("chunk_chars must be at least 1")
    choices: Sequence[Mapping[str, Any]] = completion.get("choices") or ()
    chat = completion.get("object") == CHAT or any("message" in c for c in choices)
    base = {
        "id": completion.get("id"),
        "object": CHAT_CHUNK if chat else TEXT,
        "created": completion.get("created"),
        "model": completion.get("model"),
    }
    extra = {
        name: value
        for name, value in completion.items()
        if name not in base and name not in {"choices", "usage"} and value is not None
    }
    per_choice = [
        (_chat_choice_chunks if chat else _text_choice_chunks)(position, choice, chunk_chars)
        for position, choice in enumerate(choices)
    ]
    events: list[bytes] = []
    for piece in itertools.chain.from_iterable(itertools.zip_longest(*per_choice)):
        if piece is not None:
            chunk = {**base, "choices": [piece]}
            if not events:
                chunk.update(extra)
            events.append(event(chunk))
    if include_usage:
        events.append(event({**base, "choices": [], "usage": completion.get("usage")}))
    events.append(DONE)
    return events


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _final(choice: Mapping[str, Any], index: int, body: dict[str, Any]) -> dict[str, Any]:
    final: dict[str, Any] = {"index": index, **body, "logprobs": choice.get("logprobs")}
    final["finish_reason"] = choice.get("finish_reason")
    final.update(
        (name, value)
        for name, value in choice.items()
        if name not in _CHOICE_OWN and value is not None
    )
    return final


def _chat_choice_chunks(
    position: int, choice: Mapping[str, Any], size: int
) -> list[dict[str, Any]]:
    index = choice.get("index", position)
    message: Mapping[str, Any] = choice.get("message") or {}
    content = message.get("content")

    def delta(body: dict[str, Any]) -> dict[str, Any]:
        return {"index": index, "delta": body, "logprobs": None, "finish_reason": None}

    first = {"role": message.get("role") or "assistant"}
    out = [delta({**first, "content": "" if isinstance(content, str) else None})]
    rest: dict[str, Any] = {}
    for name, value in message.items():
        if name in _MESSAGE_OWN or value is None:
            continue
        if isinstance(value, str):  # reasoning_content, reasoning, refusal...
            out += [delta({name: piece}) for piece in _pieces(value, size) or [""]]
        else:
            rest[name] = value
    if isinstance(content, str):
        out += [delta({"content": piece}) for piece in _pieces(content, size)]
    function_call = message.get("function_call")
    if isinstance(function_call, Mapping):
        head, arguments = _split_arguments(function_call)
        out.append(delta({"function_call": head}))
        out += [delta({"function_call": {"arguments": p}}) for p in _pieces(arguments, size)]
    for number, call in enumerate(message.get("tool_calls") or ()):
        call_index = call.get("index", number)
        function = call.get("function")
        head_call = {k: v for k, v in call.items() if k not in {"index", "function"}}
        head_call["index"] = call_index
        arguments = ""
        if isinstance(function, Mapping):
            head_call["function"], arguments = _split_arguments(function)
        out.append(delta({"tool_calls": [head_call]}))
        out += [
            delta({"tool_calls": [{"index": call_index, "function": {"arguments": piece}}]})
            for piece in _pieces(arguments, size)
        ]
    out.append(_final(choice, index, {"delta": rest}))
    return out


def _split_arguments(function: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A function's fields with empty arguments, and the arguments to stream after them."""
    arguments = function.get("arguments")
    head = {k: v for k, v in function.items() if k != "arguments"}
    head["arguments"] = ""
    return head, arguments if isinstance(arguments, str) else ""


def _text_choice_chunks(
    position: int, choice: Mapping[str, Any], size: int
) -> list[dict[str, Any]]:
    index = choice.get("index", position)
    text = choice.get("text")
    pieces = _pieces(text, size) if isinstance(text, str) else []
    out = [
        {"index": index, "text": piece, "logprobs": None, "finish_reason": None} for piece in pieces
    ]
    out.append(_final(choice, index, {"text": ""}))
    return out


def _merge(acc: dict[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """Merge one delta into ``acc`` (see the module docstring); returns ``acc``."""
    for name, value in delta.items():
        if value is None:
            continue
        old = acc.get(name)
        if isinstance(value, dict):
            acc[name] = _merge(old if isinstance(old, dict) else {}, value)
        elif isinstance(value, list):
            acc[name] = _extend(old if isinstance(old, list) else [], value)
        elif isinstance(old, str) and isinstance(value, str) and name not in _REPLACED:
            acc[name] = old + value
        else:
            acc[name] = value
    return acc


def _extend(acc: list[Any], values: list[Any]) -> list[Any]:
    for item in values:
        if isinstance(item, dict) and isinstance(item.get("index"), int):
            target = next(
                (e for e in acc if isinstance(e, dict) and e.get("index") == item["index"]), None
            )
            if target is None:
                acc.append(_merge({}, item))
            else:
                _merge(target, item)
        else:
            acc.append(item)
    return acc
