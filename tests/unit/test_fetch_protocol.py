"""The artifact fetch protocol's frames: strict decoding of what peers send (fuzzed)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pollen.mesh.fetch import (
    MAX_HEADER_BYTES,
    ArtifactUnavailable,
    FetchAnswer,
    FetchAttempt,
    FetchProtocolError,
    FetchRequest,
)
from pollen.runtime.artifacts import MAX_ARTIFACT_BYTES

DIGEST = "sha256:" + "ab" * 32

digests = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


@given(digests)
def test_requests_round_trip(digest: str) -> None:
    assert FetchRequest.decode(FetchRequest(digest).encode()) == FetchRequest(digest)


@given(st.integers(0, MAX_ARTIFACT_BYTES))
def test_size_answers_round_trip(size: int) -> None:
    answer = FetchAnswer.decode(FetchAnswer(size=size).encode())
    assert answer == FetchAnswer(size=size) and answer.ok


@given(st.text(max_size=2000))
def test_error_answers_round_trip_within_the_limit(error: str) -> None:
    frame = FetchAnswer(error=error).encode()
    assert len(frame) <= MAX_HEADER_BYTES
    answer = FetchAnswer.decode(frame)
    assert not answer.ok and answer.error is not None and answer.error.isprintable()
    assert len(answer.error) == min(len(error), 160)


@given(st.binary(max_size=2048))
def test_fuzzed_bytes_raise_only_protocol_errors(frame: bytes) -> None:
    for decode in (FetchRequest.decode, FetchAnswer.decode):
        with contextlib.suppress(FetchProtocolError):
            decode(frame)


@given(json_values)
def test_fuzzed_json_raises_only_protocol_errors(value: object) -> None:
    frame = json.dumps(value).encode()
    for decode in (FetchRequest.decode, FetchAnswer.decode):
        with contextlib.suppress(FetchProtocolError):
            decode(frame)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"null",
        b"[]",
        b'{"digest": null}',
        b'{"digest": "sha256:' + b"AB" * 32 + b'"}',
        b'{"digest": "sha256:../../etc/passwd"}',
        b'{"digest": "' + DIGEST.encode() + b'", "offset": 0}',
        b'{"digest": "' + DIGEST.encode() + b'", "manifest": 1}',
        b'{"digest": "' + DIGEST.encode() + b'", "chunk": -1}',
        b'{"digest": "' + DIGEST.encode() + b'", "chunk": 1.0}',
        b'{"digest": "' + DIGEST.encode() + b'", "chunk": 5000}',
        b'{"digest": "' + DIGEST.encode() + b'", "manifest": true, "chunk": 0}',
        b'{"digest": "' + DIGEST.encode() + b'"' + b" " * 1100 + b"}",
    ],
)
def test_bad_requests(frame: bytes) -> None:
    with pytest.raises(FetchProtocolError):
        FetchRequest.decode(frame)


@pytest.mark.parametrize(
    "frame",
    [
        b"{}",
        b'{"size": -1}',
        b'{"size": 1.5}',
        b'{"size": true}',
        b'{"size": "12"}',
        b'{"size": ' + str(MAX_ARTIFACT_BYTES + 1).encode() + b"}",
        b'{"size": 1, "error": "both"}',
        b'{"error": 7}',
        b'{"error": "x", "extra": 1}',
        b'{"error": "x", "port": 1}',
        b'{"size": 1, "chunk": 1000}',
        b'{"size": 1, "chunk": 32768}',
        b'{"size": 1, "chunk": 33554432}',
        b'{"size": 1, "port": 0}',
        b'{"size": 1, "port": 65536}',
        b'{"size": 1, "length": -1}',
    ],
)
def test_bad_answers(frame: bytes) -> None:
    with pytest.raises(FetchProtocolError):
        FetchAnswer.decode(frame)


def test_unavailable_names_what_was_tried() -> None:
    nobody = ArtifactUnavailable(DIGEST)
    assert str(nobody) == f"cannot fetch {DIGEST}: no alive node advertises it"
    failed = ArtifactUnavailable(
        DIGEST, (FetchAttempt("n2", "refused: busy"), FetchAttempt("n3", "cut off"))
    )
    assert str(failed) == (
        f"cannot fetch {DIGEST}: every holder failed (n2: refused: busy; n3: cut off)"
    )


@given(digests, st.booleans(), st.none() | st.integers(0, 4096))
def test_manifest_and_chunk_requests_round_trip(
    digest: str, manifest: bool, chunk: int | None
) -> None:
    if manifest and chunk is not None:
        chunk = None
    request = FetchRequest(digest, manifest, chunk)
    assert FetchRequest.decode(request.encode()) == request


@given(
    st.integers(0, MAX_ARTIFACT_BYTES),
    st.none() | st.sampled_from([1 << 16, 1 << 20, 4 << 20, 16 << 20]),
    st.none() | st.integers(1, 65535),
    st.none() | st.integers(0, 16 << 20),
)
def test_answers_with_chunk_port_and_length_round_trip(
    size: int, chunk: int | None, port: int | None, length: int | None
) -> None:
    answer = FetchAnswer(size=size, chunk=chunk, port=port, length=length)
    assert FetchAnswer.decode(answer.encode()) == answer
