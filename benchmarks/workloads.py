"""The ops' benchmark workloads (:mod:`dreamportrait.workloads`) and a peak-memory probe.

    python benchmarks/workloads.py OP WORKLOAD BACKEND forward|backward

prints the peak resident memory one call adds beyond its inputs.
"""

from __future__ import annotations

import sys

from dreamportrait.workloads import (  # noqa: F401 - the benchmarks import the workloads from here
    ATTENTION_WORKLOADS,
    COMPOSITE_WORKLOADS,
    DECODER_WORKLOADS,
    TRIPLANE_WORKLOADS,
    make_call,
)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Reset the resident-memory high-water mark to the current usage (Linux) and return it.

    (getrusage's ru_maxrss cannot be used: a child inherits its parent's peak across exec.)
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def _probe(op: str, workload_name: str, backend: str, backward: bool) -> None:
    """Print the peak resident memory a call adds beyond its inputs (run in a fresh process, on
    the first real call: a second one would reuse memory the first left in the heap)."""
    make_call(op, "warm-up", backend, backward)[0]()
    call, _ = make_call(op, workload_name, backend, backward)
    baseline = reset_peak_rss()
    call()
    print(peak_rss_bytes() - baseline)


if __name__ == "__main__":
    _probe(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "backward")
