"""Triage policy, worklist entries, reprioritization and the audit trail."""
