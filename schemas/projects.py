"""Project (tenant) identifiers shared by every service.

A project is an OpenAI-style tenant: every file, batch, result, dead letter,
webhook endpoint and delivery belongs to exactly one.  Rows that existed
before projects were introduced belong to the default project.
"""

from __future__ import annotations

DEFAULT_PROJECT_ID = "proj_default"
"""The project that holds pre-project data and ``JETBATCH_API_KEY`` callers."""

DEFAULT_PROJECT_NAME = "Default project"
