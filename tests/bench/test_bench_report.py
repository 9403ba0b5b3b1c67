"""The warnings wsiseg-bench's report carries when its figures cannot be trusted (:mod:`wsiseg.bench.report`)."""

from __future__ import annotations


def test_bench_warns_when_figures_cannot_be_trusted() -> None:
    """A pipeline faster than its own bound, or naive halves far apart, means the machine's load moved mid-run: the
    report says so instead of printing e.g. '222 % of the model bound' as a finding."""
    from wsiseg.bench.report import bench_warnings

    assert bench_warnings(0.93, [19.5, 19.1]) == []
    [beyond] = bench_warnings(2.22, [19.5, 19.1])
    assert "pipeline efficiency 222% exceeds the bound" in beyond and "re-run" in beyond
    [drift] = bench_warnings(0.9, [15.0, 19.5])
    assert "naive halves differ by 30%" in drift
    assert len(bench_warnings(1.2, [10.0, 20.0])) == 2
