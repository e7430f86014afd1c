"""The WAGI mapping, as pure functions: request to environment, stdout to response."""

from __future__ import annotations

from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pollen.runtime.errors import BadRequest, MalformedResponse
from pollen.runtime.executors import HttpExecutor
from pollen.runtime.sandbox import Sandbox
from pollen.runtime.wagi import HttpRequest, cgi_environ, parse_cgi_output

header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True)
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=0, max_size=40
).map(str.strip)


def test_request_variables() -> None:
    request = HttpRequest(
        method="post",
        path="/a%20b/c",
        query="x=1&y=2",
        headers=(("Content-Type", "application/json"), ("X-Trace", "abc")),
        body=b"{}",
        server_name="example.test",
        server_port=8080,
        remote_addr="10.0.0.9",
        script_name="/hello",
    )
    env = cgi_environ(request, {"GREETING": "hi", "REQUEST_METHOD": "spoofed"})
    assert env["GREETING"] == "hi"
    assert env["REQUEST_METHOD"] == "POST"  # CGI variables win over the Workload's env
    assert env["PATH_INFO"] == "/a b/c"
    assert env["X_RAW_PATH_INFO"] == "/a%20b/c"
    assert env["QUERY_STRING"] == "x=1&y=2"
    assert env["CONTENT_TYPE"] == "application/json"
    assert env["CONTENT_LENGTH"] == "2"
    assert env["SCRIPT_NAME"] == "/hello"
    assert env["SERVER_NAME"] == "example.test"
    assert env["SERVER_PORT"] == "8080"
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "10.0.0.9"
    assert env["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert env["X_FULL_URL"] == "http://example.test:8080/hello/a%20b/c?x=1&y=2"
    assert env["HTTP_X_TRACE"] == "abc"
    assert "HTTP_CONTENT_TYPE" not in env


def test_headers_that_are_not_passed_on() -> None:
    request = HttpRequest(
        headers=(
            ("Proxy", "http://evil.test"),  # would become HTTP_PROXY
            ("X_Underscore", "shadow"),
            ("Connection", "keep-alive"),
            ("Bad Name", "x"),
            ("X-Ok", "yes"),
        )
    )
    env = cgi_environ(request)
    assert "HTTP_PROXY" not in env
    assert "HTTP_X_UNDERSCORE" not in env
    assert "HTTP_CONNECTION" not in env
    assert env["HTTP_X_OK"] == "yes"


def test_repeated_headers_join() -> None:
    headers = (("Accept", "a"), ("accept", "b"), ("Cookie", "x=1"), ("Cookie", "y=2"))
    env = cgi_environ(HttpRequest(headers=headers))
    assert env["HTTP_ACCEPT"] == "a, b"
    assert env["HTTP_COOKIE"] == "x=1; y=2"


def test_nul_is_refused_in_the_path_and_dropped_in_values() -> None:
    with pytest.raises(BadRequest):
        cgi_environ(HttpRequest(path="/a%00b"))
    env = cgi_environ(HttpRequest(headers=(("X-A", "a\x00b"),)), {"K": "v\x00w"})
    assert env["HTTP_X_A"] == "ab"
    assert env["K"] == "vw"


@given(st.lists(st.tuples(header_names, header_values), max_size=8))
def test_every_plain_header_maps(headers: list[tuple[str, str]]) -> None:
    env = cgi_environ(HttpRequest(headers=tuple(headers)))
    for name, _ in headers:
        if name.lower() in {
            "content-type",
            "content-length",
            "proxy",
            "connection",
            "keep-alive",
            "te",
            "upgrade",
        }:
            continue
        assert "HTTP_" + name.upper().replace("-", "_") in env


def test_response_with_status_and_headers() -> None:
    response = parse_cgi_output(
        b"Content-Type: text/html\r\nStatus: 404 Not Found\r\nX-A: 1\r\nX-A: 2\r\n\r\n<p>no</p>"
    )
    assert response.status == 404
    assert response.header("content-type") == "text/html"
    assert [v for k, v in response.headers if k == "X-A"] == ["1", "2"]
    assert response.body == b"<p>no</p>"


def test_location_means_redirect() -> None:
    response = parse_cgi_output(b"Location: /elsewhere\n\n")
    assert response.status == 302
    assert response.header("Location") == "/elsewhere"
    assert parse_cgi_output(b"Location: /x\nStatus: 301\n\n").status == 301


def test_body_keeps_blank_lines_and_binary() -> None:
    body = b"line\n\nafter blank\x00\xff"
    response = parse_cgi_output(b"Content-Type: application/octet-stream\n\n" + body)
    assert response.body == body
    assert response.status == 200


def test_framing_headers_from_the_module_are_dropped() -> None:
    response = parse_cgi_output(b"Content-Length: 999\nTransfer-Encoding: chunked\n\nabc")
    assert response.header("Content-Length") is None
    assert response.header("Transfer-Encoding") is None


@pytest.mark.parametrize(
    ("output", "words"),
    [
        (b"", "nothing"),
        (b"just a body without headers", "blank line"),
        (b"no colon here\n\nbody", "Name: value"),
        (b"Status: banana\n\n", "Status"),
        (b"Status: 99\n\n", "Status"),
        (b"Status: 600\n\n", "Status"),
    ],
)
def test_malformed_output(output: bytes, words: str) -> None:
    with pytest.raises(MalformedResponse) as caught:
        parse_cgi_output(output, workload="w")
    assert words in str(caught.value)
    assert 'workload "w"' in str(caught.value)


@given(st.binary(max_size=200))
def test_arbitrary_output_never_crashes(output: bytes) -> None:
    try:
        response = parse_cgi_output(output)
    except MalformedResponse:
        return
    assert 100 <= response.status <= 599


@given(
    st.lists(st.tuples(header_names, header_values), max_size=6),
    st.dictionaries(
        st.sampled_from(["GREETING", "REQUEST_METHOD", "HTTP_X_A", "HTTP_HOST", "PATH_INFO", "K"]),
        st.text(max_size=10),
        max_size=4,
    ),
    st.sampled_from(["/", "/a%20b", "/caf%C3%A9", "/x/y"]),
    st.sampled_from(["", "q=1", "a=%00"]),
)
def test_the_executors_encoded_environment_is_cgi_environ(
    headers: list[tuple[str, str]], workload_env: dict[str, str], path: str, query: str
) -> None:
    """The http executor encodes the environment in cached parts; the variables must be
    exactly ``cgi_environ``'s (NUL dropped, as WASI's C strings would end there)."""
    executor = HttpExecutor("w", cast(Sandbox, None), env=workload_env)
    request = HttpRequest(
        path=path,
        query=query,
        headers=(("Host", "example.test"), *headers),
        server_name="example.test",
        server_port=8080,
    )
    for _ in range(2):  # the second time from the caches
        environ = executor.environ(request)
        names = [name.decode() for name in environ.names]
        values = [value.decode() for value in environ.values]
        assert len(names) == len(set(names))
        expected = {
            key.replace("\x00", ""): value.replace("\x00", "")
            for key, value in cgi_environ(request, workload_env).items()
        }
        assert dict(zip(names, values, strict=True)) == expected


def test_cr_before_the_first_lf_blank_line() -> None:
    response = parse_cgi_output(b"X-A: 1\r\n\r\nbody\n\nmore")
    assert response.header("X-A") == "1"
    assert response.body == b"body\n\nmore"
    crlf_later = parse_cgi_output(b"X-A: 1\n\nbody\r\n\r\nmore")
    assert crlf_later.body == b"body\r\n\r\nmore"


def test_a_known_header_name_without_a_colon_is_malformed() -> None:
    with pytest.raises(MalformedResponse):
        parse_cgi_output(b"Content-Type\n\nbody")
