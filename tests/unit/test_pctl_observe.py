"""What ``pctl logs`` and ``pctl top`` print, from API objects (no node needed)."""

from __future__ import annotations

from pollen.cli.pctl import (
    TOP_NODE_HEADERS,
    TOP_WORKLOAD_HEADERS,
    cpu_time,
    log_text,
    render_table,
    top_memory,
    top_node_row,
    top_workload_row,
)

LINE = {
    "time": "2026-11-23T10:00:00.123456Z",
    "replica": "cpu-1a2b",
    "node": "n2",
    "stream": "stderr",
    "text": "cpu: 1000 of 5000 checked",
}


def test_log_lines_print_raw_unless_asked_for_more() -> None:
    assert log_text(LINE) == "cpu: 1000 of 5000 checked"
    assert log_text(LINE, prefix=True) == "[n2/cpu-1a2b] cpu: 1000 of 5000 checked"
    assert log_text(LINE, prefix=True, timestamps=True) == (
        "[n2/cpu-1a2b] 2026-11-23T10:00:00.123456Z cpu: 1000 of 5000 checked"
    )
    assert log_text({"text": ""}) == ""


def test_quantities_read_like_kubectl_top() -> None:
    assert [top_memory(v) for v in (0, 512 * 1024, 3 << 30, None, True)] == [
        "0",
        "512Ki",
        "3072Mi",
        "<unknown>",
        "<unknown>",
    ]
    assert [cpu_time(v) for v in (0.004693, 12.34, 600, "x")] == [
        "0.00s",
        "12.3s",
        "10m",
        "<unknown>",
    ]


def test_top_nodes_rows() -> None:
    metrics = {
        "kind": "NodeMetrics",
        "usage": {
            "cpuPercent": 12.6,
            "memoryUsedBytes": 3 << 30,
            "memoryPercent": 19.2,
            "instances": 3,
        },
    }
    table = render_table(TOP_NODE_HEADERS, [top_node_row("n1", metrics), top_node_row("n2", None)])
    assert table.splitlines() == [
        "NAME   CPU%        MEMORY      MEMORY%     INSTANCES",
        "n1     13%         3072Mi      19%         3",
        "n2     <unknown>   <unknown>   <unknown>   <unknown>",
    ]
    # The first sample of a node that just started has no CPU figure yet.
    assert top_node_row("n3", {"usage": {"cpuPercent": None}})[1] == "<unknown>"


def test_top_workloads_rows_sum_the_replicas() -> None:
    metrics = {
        "replicas": [
            {"requests": 10, "errors": 1, "cpuSeconds": 0.5, "memoryBytes": 0,
             "memoryPeakBytes": 2 << 20},
            {"requests": 5, "errors": 0, "cpuSeconds": 1.25, "memoryBytes": 3 << 20,
             "memoryPeakBytes": 1 << 20},
            "not a replica",
        ]
    }  # fmt: skip
    assert TOP_WORKLOAD_HEADERS == ["NAME", "REPLICAS", "REQUESTS", "ERRORS", "CPU", "MEMORY"]
    assert top_workload_row("hello", metrics) == ["hello", "2", "15", "1", "1.75s", "5Mi"]
    assert top_workload_row("gone", None) == ["gone", *["<unknown>"] * 5]
    assert top_workload_row("idle", {"replicas": []}) == ["idle", "0", "0", "0", "0.00s", "0"]
    # Values a node should never send do not break the row.
    odd = {"replicas": [{"requests": "many", "errors": -3, "cpuSeconds": True}]}
    assert top_workload_row("odd", odd) == ["odd", "1", "0", "0", "0.00s", "0"]
