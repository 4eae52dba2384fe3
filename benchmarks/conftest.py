"""Collects each benchmark's best time (and peak memory) and prints ratios to the baseline."""

from __future__ import annotations

import pytest

_results: dict[tuple[str, str], dict] = {}
BASELINES = ("reference", "unconditioned", "baseline")
"""What a group's other implementations are compared with: the reference ops, the generator without
text (text conditioning), or the per-prompt SDS baseline (generation)."""
SECOND_BASELINES = {"sdpa": "sdpa+gate", "sample-mean": "sample-mean"}
"""Stronger baselines the kernels ("cpu", "cuda", "triton") are also compared with, by their names in
the summary: torch's fused attention plus the gate, and the sampling kernel's own mean followed by
the MLP (against the fused sample-and-decode op)."""


@pytest.fixture
def record():
    """record(group, implementation, benchmark, **extra): remember a finished benchmark."""

    def _record(group: str, implementation: str, benchmark, **extra) -> None:
        benchmark.extra_info.update(extra)
        _results[(group, implementation)] = dict(seconds=benchmark.stats.stats.min, **extra)

    return _record


def pytest_terminal_summary(terminalreporter):
    groups = sorted({group for group, _ in _results})
    rows = []
    for group in groups:
        baseline = next((name for name in BASELINES if (group, name) in _results), None)
        reference = _results.get((group, baseline))
        for (g, implementation), result in sorted(_results.items()):
            if g != group or implementation == baseline or reference is None:
                continue
            row = (
                f"{group:<48} {implementation:<8} {result['seconds'] * 1e3:8.1f} ms vs {baseline} "
                f"{reference['seconds'] * 1e3:8.1f} ms: {reference['seconds'] / result['seconds']:5.2f}x"
            )
            if "peak_extra_MiB" in result and "peak_extra_MiB" in reference:
                row += f" | peak extra {result['peak_extra_MiB']:7.1f} vs {reference['peak_extra_MiB']:7.1f} MiB"
            if "temporaries_MiB" in result and "temporaries_MiB" in reference:
                row += f", temporaries {result['temporaries_MiB']:7.1f} vs {reference['temporaries_MiB']:7.1f} MiB"
            rows.append(row)
        for second, label in SECOND_BASELINES.items():
            other = _results.get((group, second))
            for implementation in ("cpu", "cuda", "triton"):
                result = _results.get((group, implementation))
                if other and result:
                    rows.append(
                        f"{group:<48} {implementation:<8} {result['seconds'] * 1e3:8.1f} ms vs {label} "
                        f"{other['seconds'] * 1e3:8.1f} ms: {other['seconds'] / result['seconds']:5.2f}x"
                    )
    if rows:
        terminalreporter.section("speed-up over the baseline of each group (best of rounds)")
        for row in rows:
            terminalreporter.write_line(row)
