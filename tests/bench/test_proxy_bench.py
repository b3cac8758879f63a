"""The proxy benchmark runs end to end: an instance, the real haproxy kept by ProxyKeeper, the
load generator against both (a new connection a request, the proxy reloading meanwhile), and a
summary. No timing is asserted: only that both paths were measured and that every request was
answered, through the reloads too, and that it ran shared and pinned (the instance alone on a
core)."""

from __future__ import annotations

import re
import shutil

import pytest

from bench import proxy
from tests.images import unavailable


def test_the_proxy_benchmark_measures_both_paths(capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("haproxy") is None:
        unavailable("haproxy is not installed (apt-get install haproxy)")
    arguments = ["--duration", "2", "--rounds", "1", "--reload-every", "0.5", "--close"]
    assert proxy.main(arguments) == 0
    output = capsys.readouterr().out
    for kind in ("direct", "proxy"):
        line = next(row for row in output.splitlines() if row.strip().startswith(f"{kind}:"))
        rate = re.search(r"([\d,]+) req/s", line)
        assert rate is not None, line
        assert int(rate[1].replace(",", "")) > 0, line
        assert "errors 0" in line, line
    assert re.search(r"proxy: .* [1-9]\d* reloads", output), output
    # Measured with every process on every core, then with the instance on a core of its own.
    assert re.search(r"^shared: through the proxy .* of direct throughput", output, re.M), output
    assert re.search(r"^pinned: through the proxy .* of direct throughput", output, re.M), output
