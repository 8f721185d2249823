"""README's "How the code is laid out" is generated from the services' declarations
(services/layout.py); this fails when the two drift apart (`just docs` fixes it)."""

from __future__ import annotations

from pathlib import Path

from services import layout

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_layout_section_matches_the_declared_consumers_and_emitted_messages() -> None:
    text = README.read_text()
    assert layout.with_layout(text) == text, "README's layout section is stale: run `just docs`"


def test_every_service_declares_its_consumers_and_what_it_emits() -> None:
    table = layout.markdown()
    for name in layout.SERVICES:
        assert f"`services/{name}`" in table
    assert "REQUESTS `jetbatch.requests.MODEL.*.dispatched` as `inference-MODEL`" in table
    assert "`jetbatch.requests.MODEL.*.batch, " in table
    assert "RESULTS `jetbatch.results.>` as `results_writer`" in table
