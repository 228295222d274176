"""The config reference (docs/reference/config.md) is generated from the pydantic schemas and committed."""

from __future__ import annotations

from pathlib import Path

from optorch import builder, schedules
from optorch.algorithms import registry
from optorch.tools import docgen

ROOT = Path(__file__).resolve().parents[2]


def test_committed_reference_is_current() -> None:
    committed = (ROOT / docgen.PAGE).read_text()
    assert committed == docgen.render(), (
        f"{docgen.PAGE} is stale (a Config, a schedule or a top-level entry changed): "
        "regenerate it with `python -m optorch.tools.docgen` from the repository root and commit it"
    )


def test_every_field_is_described_and_every_description_is_used() -> None:
    assert docgen.undescribed() == [], (
        "give these fields a docstring (or a shared description: optorch.core.config.SHARED_DESCRIPTIONS)"
    )


def test_every_algorithm_schedule_and_entry_has_a_section() -> None:
    page = docgen.render()
    for name in registry.names():
        assert f"\n### {name}\n" in page and f"](../algorithms/{name}.md)" in page
    for name in schedules.names():
        assert f"#### {builder.SCHEDULE_KEY}: {name} " in page
    assert [entry.key for entry in docgen.ENTRIES][0] == builder.SCHEDULE_KEY


def _row(page: str, section: str, key: str) -> list[str]:
    body = page[page.index(section) :]
    line = next(line for line in body.splitlines() if line.startswith(f"| `{key}` |"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def test_rows_state_types_defaults_and_constraints() -> None:
    # each expected row is read off the Config definitions in the algorithm modules
    page = docgen.render()
    assert _row(page, "\n### adam\n", "betas") == [
        "`betas`",
        "(scalar, scalar)",
        "`(0.9, 0.999)`",
        "each in [0, 1)",
        "decay rates of the first and second moment averages",
    ]
    assert _row(page, "\n### adam\n", "eps")[1:4] == ["scalar", "`1e-8`", ">= 0"]
    assert _row(page, "\n### adafactor\n", "beta2_decay")[1:4] == ["scalar", "`-0.8`", "<= 0"]
    assert _row(page, "\n### adafactor\n", "eps")[1:4] == ["(scalar or None, scalar)", "`(None, 0.001)`", "each >= 0"]
    assert _row(page, "#### Hyper", "p_star")[1:4] == ["float", "`0.1`", "in (0, 1)"]
    assert _row(page, "#### Hyper", "alpha_max")[2] == "`1e12`"
    assert _row(page, "\n### sgd\n", "nesterov")[1:4] == ["bool", "`False`", ""]
    assert _row(page, "schedules-cosine}", "decay_steps")[1:4] == ["int", "required", ">= 1, <= 2**53"]
    assert _row(page, "schedules-onecycle}", "pct_start")[1:4] == ["float", "`0.3`", "in (0, 1)"]
    # a field docstring wins over a shared description
    assert "ndim <= 1" in _row(page, "\n### lars\n", "exclude_1d")[4]


def test_check_mode(tmp_path: Path) -> None:
    page = tmp_path / "config.md"
    assert docgen.main(["--out", str(page), "--check"]) == 1
    assert docgen.main(["--out", str(page)]) == 0
    assert docgen.main(["--out", str(page), "--check"]) == 0
    assert page.read_text() == docgen.render()
