"""LogBuffer subscribers and reads after a sequence number, as ``pctl logs -f`` uses them."""

from __future__ import annotations

import threading

from pollen.runtime.logs import LogBuffer, LogLine


def test_subscribers_hear_every_line_until_they_unsubscribe() -> None:
    logs = LogBuffer()
    heard: list[LogLine] = []
    stop = logs.subscribe(heard.append)
    logs.write("stdout", b"one\ntw")
    logs.log("info", "noted")
    logs.write("stdout", b"o\n")
    assert [(line.stream, line.text) for line in heard] == [
        ("stdout", "one"),
        ("log", "noted"),
        ("stdout", "two"),
    ]
    stop()
    stop()  # twice is harmless
    logs.write("stderr", b"unheard\n")
    assert len(heard) == 3


def test_lines_after_a_sequence_number_survive_the_ring_dropping_old_ones() -> None:
    logs = LogBuffer(max_lines=3)
    for n in range(1, 8):
        logs.write("stdout", f"{n}\n".encode())
    assert [line.seq for line in logs.lines()] == [5, 6, 7]
    assert [line.seq for line in logs.lines(after=6)] == [7]
    assert logs.lines(after=7) == []
    # A follower that fell behind gets what is kept, and can tell how much it missed.
    assert [line.seq for line in logs.lines(after=2)] == [5, 6, 7]


def test_lines_written_from_threads_reach_a_subscriber_once_each() -> None:
    logs = LogBuffer()
    seqs: list[int] = []
    logs.subscribe(lambda line: seqs.append(line.seq))
    writers = [
        threading.Thread(target=lambda: [logs.write("stdout", b"x\n") for _ in range(200)])
        for _ in range(4)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert sorted(seqs) == list(range(1, 801))
