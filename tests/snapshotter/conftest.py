"""Fixtures of the snapshotter tests: one registry with the app image for the package, a
fresh containerd and snapshotter per test (with the logs' tails in a failed test's report)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd, running_containerd
from tests.support.node_fixtures import (  # the fixtures: used by name
    add_logs,
    image_fixture,  # noqa: F401
    registry_fixture,  # noqa: F401
    short_work_dir,
)
from tests.support.registry import Registry


@pytest.fixture(scope="package")
def work() -> Iterator[Path]:
    yield from short_work_dir("lzc-")


@pytest.fixture
def containerd(work: Path, registry: Registry, request: pytest.FixtureRequest
               ) -> Iterator[Containerd]:
    with running_containerd(work / f"c{request.node.name[-12:]}") as running:
        yield running


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Containerd):
            add_logs(report, value)
