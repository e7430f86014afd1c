"""The gateway's forwarding frames and routing order: strict decoding of what peers send
(fuzzed), and the nearest-first rule."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pollen.api.forward import (
    MAX_HEAD_BYTES,
    ForwardedAnswer,
    ForwardedRequest,
    ForwardError,
)
from pollen.api.gateway import nearest_first
from pollen.runtime import abi
from pollen.runtime.wagi import HttpRequest, HttpResponse

REQUEST = HttpRequest(
    method="POST",
    path="/a/b%20c",
    query="x=1&y=%C3%A9",
    headers=(("Host", "gw.example:8080"), ("Cookie", "a=1"), ("Cookie", "b=2")),
    body=b"the body",
    server_name="gw.example",
    server_port=8080,
    remote_addr="10.1.2.3",
    script_name="/echo",
)

# What a header value may hold: anything but what ends a line, and no lone surrogates (which
# no encoding can carry).
HEADER_CHARS = st.characters(blacklist_characters="\r\n\x00", blacklist_categories=("Cs",))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


def head_of(
    request: HttpRequest = REQUEST, workload: str = "echo", depth: int = 0
) -> dict[str, Any]:
    value = orjson.loads(ForwardedRequest(workload, request, depth).encode())
    assert isinstance(value, dict)
    return value


def test_a_request_round_trips_with_its_route() -> None:
    forwarded = ForwardedRequest("echo", REQUEST, depth=3)
    decoded = ForwardedRequest.decode(forwarded.encode(), REQUEST.body)
    assert decoded == forwarded
    # The route comes from the workload's name on the target, not from the origin.
    plain = ForwardedRequest("echo", HttpRequest(path="/"))
    assert ForwardedRequest.decode(plain.encode()).request.script_name == "/echo"


@given(
    st.text(alphabet=HEADER_CHARS, max_size=200),
    st.sampled_from(["GET", "HEAD", "DELETE", "PROPFIND", "M-SEARCH"]),
    st.integers(0, abi.MAX_CALL_DEPTH),
)
def test_header_values_methods_and_depths_round_trip(value: str, method: str, depth: int) -> None:
    request = HttpRequest(method=method, headers=(("X-Any", value),), script_name="/w")
    forwarded = ForwardedRequest("w", request, depth)
    assert ForwardedRequest.decode(forwarded.encode()) == forwarded


@given(
    st.integers(100, 599),
    st.lists(
        st.tuples(
            st.from_regex(r"\A[A-Za-z0-9_-]{1,20}\Z"),
            st.text(alphabet=HEADER_CHARS, max_size=60),
        ),
        max_size=5,
    ),
    st.none() | st.text(max_size=200),
)
def test_answers_round_trip(status: int, headers: list[tuple[str, str]], error: str | None) -> None:
    response = HttpResponse(status, tuple(headers), error=error)
    answer = ForwardedAnswer.decode_head(ForwardedAnswer(response).encode_head())
    assert answer.response is not None
    assert (answer.response.status, answer.response.headers) == (status, tuple(headers))
    if error is None:
        assert answer.response.error is None
    else:
        assert answer.response.error is not None and answer.response.error.isprintable()


def test_a_refusal_round_trips() -> None:
    answer = ForwardedAnswer.decode_head(ForwardedAnswer(refused="draining\n").encode_head())
    assert (answer.response, answer.refused) == (None, "draining?")


def test_headers_a_peer_would_refuse_are_left_out_of_an_answer() -> None:
    response = HttpResponse(
        200, (("Good", "yes"), ("Bad Name", "x"), ("Split", "a\r\nb"), ("Lone", "\ud800"))
    )
    answer = ForwardedAnswer.decode_head(ForwardedAnswer(response).encode_head())
    assert answer.response is not None and answer.response.headers == (("Good", "yes"),)


@given(st.binary(max_size=2048))
def test_fuzzed_bytes_raise_only_forward_errors(frame: bytes) -> None:
    with contextlib.suppress(ForwardError):
        ForwardedRequest.decode(frame)
    with contextlib.suppress(ForwardError):
        ForwardedAnswer.decode_head(frame)


@given(json_values)
def test_fuzzed_json_raises_only_forward_errors(value: object) -> None:
    frame = json.dumps(value).encode()
    with contextlib.suppress(ForwardError):
        ForwardedRequest.decode(frame)
    with contextlib.suppress(ForwardError):
        ForwardedAnswer.decode_head(frame)


@given(st.sampled_from(sorted(head_of())), json_values)
def test_a_request_head_with_one_field_replaced_is_refused_or_still_valid(
    field: str, value: object
) -> None:
    head = head_of()
    head[field] = value
    try:
        decoded = ForwardedRequest.decode(json.dumps(head).encode())
    except ForwardError:
        return
    # Whatever got through is well-formed: a workload name, an absolute path, a bounded depth.
    assert decoded.request.path.startswith("/")
    assert 0 <= decoded.depth <= abi.MAX_CALL_DEPTH


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"workload": "Echo"}, "names no valid workload"),
        ({"workload": "../etc"}, "names no valid workload"),
        ({"method": "GET /"}, "malformed method"),
        ({"path": "relative"}, "not an absolute path"),
        ({"path": "/a b"}, "not an absolute path"),
        ({"query": "a\nb"}, "query is malformed"),
        ({"headers": [["Host"]]}, "malformed header"),
        ({"headers": [["Bad Name", "x"]]}, "malformed header"),
        ({"headers": [["X", "a\r\nInjected: yes"]]}, "malformed header"),
        ({"headers": [["X", "v"]] * 300}, "at most 256 pairs"),
        ({"port": 70000}, "port outside"),
        ({"port": True}, "port outside"),
        ({"depth": abi.MAX_CALL_DEPTH + 1}, "depth is outside"),
        ({"depth": -1}, "depth is outside"),
        ({"scheme": "gopher"}, "neither http nor https"),
        ({"protocol": "SPDY/3"}, "not HTTP/x.y"),
        ({"remote": "a\x00b"}, "remote address"),
        ({"extra": 1}, "missing or unknown fields"),
    ],
)
def test_malformed_request_heads_are_refused(change: dict[str, object], message: str) -> None:
    head = head_of()
    head.update(change)
    with pytest.raises(ForwardError, match=message):
        ForwardedRequest.decode(orjson.dumps(head))


def test_a_head_over_the_limit_is_refused_before_parsing() -> None:
    with pytest.raises(ForwardError, match="over"):
        ForwardedRequest.decode(b" " * (MAX_HEAD_BYTES + 1))


def test_an_origin_refuses_to_encode_what_a_target_would_refuse() -> None:
    with pytest.raises(ForwardError, match="malformed header"):
        ForwardedRequest("echo", HttpRequest(headers=(("X", "a\nb"),))).encode()
    with pytest.raises(ForwardError, match="not an absolute path"):
        ForwardedRequest("echo", HttpRequest(path="/\ud800")).encode()


@pytest.mark.parametrize(
    "frame",
    [
        b'{"status": 200, "headers": [], "error": null, "more": 1}',
        b'{"status": 99, "headers": [], "error": null}',
        b'{"status": "200", "headers": [], "error": null}',
        b'{"status": 200, "headers": {}, "error": null}',
        b'{"status": 200, "headers": [], "error": 5}',
        b'{"refused": 1}',
        b'{"refused": "x", "status": 200}',
    ],
)
def test_malformed_answer_heads_are_refused(frame: bytes) -> None:
    with pytest.raises(ForwardError):
        ForwardedAnswer.decode_head(frame)


def test_nearest_first_puts_unknown_distances_last_and_breaks_ties_by_name() -> None:
    rtt = {"far": 0.050, "near": 0.001, "tie-b": 0.010, "tie-a": 0.010}
    order = nearest_first(
        ["unknown-b", "far", "tie-b", "near", "unknown-a", "tie-a", "far"], rtt.get
    )
    assert order == ["near", "tie-a", "tie-b", "far", "unknown-a", "unknown-b"]
