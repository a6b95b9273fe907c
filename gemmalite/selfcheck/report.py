"""What a check produces: one `CheckResult` per claim, gathered in a `CheckReport`.

A result is PASS, FAIL, SKIP (not applicable here, e.g. no CUDA) or INFO (a measured figure that
is not a pass/fail claim). Checks do not build results themselves: they call an `Add` callback
with (section, name, status, detail), and `check()` collects what it is given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import one_line

PASS, FAIL, SKIP, INFO = "PASS", "FAIL", "SKIP", "INFO"
ENVIRONMENT, CHECKS, SPEED = "Environment", "Checks", "Speed"  # the report's sections, in order
NO_CUDA = "skipped: no CUDA"

Add = Callable[[str, str, str, str], None]  # add(section, name, status, detail)


@dataclass(frozen=True)
class CheckResult:
    section: str
    name: str
    status: str  # PASS, FAIL, SKIP or INFO
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    @property
    def skipped(self) -> bool:
        return self.status == SKIP

    def line(self) -> str:
        return f"{self.status:<5} {self.name}: {self.detail}"


@dataclass
class CheckReport:
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no check failed (skips and figures do not count)."""
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.failed]

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(name)

    def summary(self) -> str:
        counts = Counter(r.status for r in self.results)
        verdict = "all checks passed" if self.ok else f"{counts[FAIL]} check(s) FAILED"
        return f"{verdict}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped, in {self.seconds:.1f} s"

    def format(self) -> str:
        lines, section = [], None
        for result in self.results:
            if result.section != section:
                section = result.section
                lines.append(section)
            lines.append("  " + result.line())
        lines.append(self.summary())
        return "\n".join(lines)

    __str__ = format


def error_text(error: BaseException) -> str:
    """An error a check caught, as its detail: a failure is reported, never a crash."""
    return one_line(error, 300, with_type=True)
