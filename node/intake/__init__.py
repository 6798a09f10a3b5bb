"""Intake: what the node decides about received series before any job exists.

- `node.intake.recognition` — plane, contrast and anatomy from the headers (what the scanner measured);
- `node.intake.routing` — the TOML rules (``routing_rules.toml``) that give a series its pipeline
  and role, ``routing explain``, the vendor table of real series (``vendor_series.toml``);
- `node.intake.completeness` — series complete, study settled, one job per study and anatomy
  (contracts C1 and C2).
"""
