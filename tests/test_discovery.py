"""Task discovery imports the ``tasks`` modules of application packages."""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskiq_beat.discovery import TaskDiscovery, discover_task_modules

FILES = {
    "__init__.py": "",
    "broker.py": "from taskiq import InMemoryBroker\nbroker = InMemoryBroker()\n",
    "tasks.py": (
        "from {pkg}.broker import broker\n\n"
        "@broker.task(task_name='root.ping')\nasync def ping() -> None: ...\n"
    ),
    "billing/__init__.py": "",
    "billing/tasks/__init__.py": "",
    "billing/tasks/invoices.py": (
        "from {pkg}.broker import broker\n\n"
        "@broker.task(task_name='billing.invoice')\nasync def invoice() -> None: ...\n"
    ),
    "reports/__init__.py": "",
    "reports/tasks.py": (
        "from {pkg}.broker import broker\n\n"
        "@broker.task(task_name='reports.render')\nasync def render() -> None: ...\n"
    ),
    "empty/__init__.py": "",
    "module_only.py": "",
}


@pytest.fixture
def package(tmp_path: Path) -> Iterator[str]:
    name = f"discoverable_{uuid.uuid4().hex[:8]}"
    for relative, content in FILES.items():
        path = tmp_path / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content.format(pkg=name))
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            del sys.modules[module]


def test_finds_tasks_modules_of_the_package_and_its_subpackages(package: str) -> None:
    names = TaskDiscovery(packages=[package]).module_names()
    assert names == (
        f"{package}.billing.tasks",
        f"{package}.billing.tasks.invoices",
        f"{package}.reports.tasks",
        f"{package}.tasks",
    )


def test_import_registers_the_tasks_on_the_broker(package: str) -> None:
    broker = importlib.import_module(f"{package}.broker").broker
    assert broker.find_task("billing.invoice") is None
    imported = discover_task_modules([package], broker=broker)
    assert f"{package}.reports.tasks" in imported
    discovery = TaskDiscovery(packages=[package], broker=broker)
    assert {"root.ping", "billing.invoice", "reports.render"} <= set(discovery.task_names())


def test_nested_modules_can_be_left_out(package: str) -> None:
    names = TaskDiscovery(packages=[package], include_nested=False).module_names()
    assert f"{package}.billing.tasks.invoices" not in names
    assert f"{package}.billing.tasks" in names


def test_a_module_is_not_a_package(package: str) -> None:
    with pytest.raises(ValueError, match="module_only"):
        TaskDiscovery(packages=[f"{package}.module_only"]).module_names()
