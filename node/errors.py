"""The exceptions of the `node` package.

NodeError                 base of every error msknode raises on purpose
├── SettingsError         invalid settings; the message names the setting
├── StorageError          the instance store cannot take an object
│   └── OutOfSpaceError   free disk below MSKNODE_MIN_FREE_GB
├── IngestError           a received object is refused; carries the DICOM status to return
├── RoutingError          an invalid routing rules file
├── ResultsError          a result object cannot be built
├── DispatchError         a destination refused or could not be reached
│   ├── TransientDispatchError   try again later (connection refused, 0xA7xx, rejected-transient)
│   └── PermanentDispatchError   never retried (0x0122, rejected-permanent)
├── JobError              a pipeline job failed
├── UserError             a web user cannot be created or changed (name, role, password)
└── EndToEndError         the demo or the end-to-end benchmark cannot run or its results are wrong
"""


class NodeError(Exception):
    """Base class of every error msknode raises on purpose."""


class SettingsError(NodeError):
    pass


class StorageError(NodeError):
    pass


class OutOfSpaceError(StorageError):
    pass


class IngestError(NodeError):
    """A received object is refused; `status` is the C-STORE status returned to the peer."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RoutingError(NodeError):
    pass


class ResultsError(NodeError):
    pass


class DispatchError(NodeError):
    pass


class TransientDispatchError(DispatchError):
    pass


class PermanentDispatchError(DispatchError):
    pass


class JobError(NodeError):
    pass


class UserError(NodeError):
    pass


class EndToEndError(NodeError):
    """The demo or the end-to-end benchmark cannot start, or a result is missing or invalid."""
