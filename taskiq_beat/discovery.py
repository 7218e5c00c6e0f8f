"""Task discovery: import the ``tasks`` modules of application packages.

A scheduler resolves task names only among the tasks registered on its broker, so the
scheduler process must import the same task modules as the worker. ``TaskDiscovery`` imports,
for each package given, its ``tasks`` module (or package, with its submodules) and the
``tasks`` modules of its direct subpackages.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskiq import AsyncBroker

__all__ = ["TaskDiscovery", "discover_task_modules"]

logger = logging.getLogger(__name__)


@dataclass
class TaskDiscovery:
    """Finds and imports the task modules of ``packages``."""

    packages: Sequence[str]
    broker: AsyncBroker | None = None
    task_module_name: str = "tasks"
    include_nested: bool = True
    log_tasks: bool = True

    def module_names(self) -> tuple[str, ...]:
        """The import paths of the task modules found, sorted (nothing is imported but packages)."""
        found: set[str] = set()
        for package_name in self.packages:
            package = importlib.import_module(package_name)
            search_path = getattr(package, "__path__", None)
            if search_path is None:
                raise ValueError(f"packages: {package_name!r} is a module, not a package")
            found.update(self._task_modules_of(package_name))
            for child in pkgutil.iter_modules(search_path, prefix=f"{package_name}."):
                if child.ispkg:
                    found.update(self._task_modules_of(child.name))
        return tuple(sorted(found))

    def import_modules(self) -> tuple[str, ...]:
        """Import every task module found; return their names."""
        names = self.module_names()
        for name in names:
            importlib.import_module(name)
        if self.log_tasks:
            logger.info(
                "imported %d task modules (%s); broker knows %d tasks: %s",
                len(names),
                ", ".join(names) or "none",
                len(self.task_names()),
                ", ".join(self.task_names()) or "none",
            )
        return names

    def task_names(self) -> tuple[str, ...]:
        """The names of the tasks registered on the broker, sorted."""
        if self.broker is None:
            return ()
        return tuple(sorted(self.broker.get_all_tasks()))

    def _task_modules_of(self, package_name: str) -> Iterator[str]:
        name = f"{package_name}.{self.task_module_name}"
        spec = importlib.util.find_spec(name)
        if spec is None:
            return
        yield name
        locations = spec.submodule_search_locations
        if self.include_nested and locations is not None:
            for sub in pkgutil.walk_packages(locations, prefix=f"{name}."):
                yield sub.name


def discover_task_modules(
    packages: Sequence[str],
    *,
    broker: AsyncBroker | None = None,
    task_module_name: str = "tasks",
    include_nested: bool = True,
    log_tasks: bool = True,
) -> tuple[str, ...]:
    """Import the task modules of ``packages`` (see :class:`TaskDiscovery`)."""
    return TaskDiscovery(
        packages=packages,
        broker=broker,
        task_module_name=task_module_name,
        include_nested=include_nested,
        log_tasks=log_tasks,
    ).import_modules()
