"""The exceptions of the `worklists` package.

WorklistError             base of every error the worklist raises on purpose
├── PolicyError           an invalid triage policy file; the message names the key
├── EntryNotFound         no worklist entry (or job) with that id
└── InvalidChange         a requested change is refused (unknown priority, empty reason, unknown user)
"""


class WorklistError(Exception):
    """Base class of every error the worklist raises on purpose."""


class PolicyError(WorklistError):
    pass


class EntryNotFound(WorklistError):
    pass


class InvalidChange(WorklistError):
    pass
