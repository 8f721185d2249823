"""Cross-cutting plumbing: config, bus, db, embedded servers, telemetry, errors, CLI. No business logic."""
