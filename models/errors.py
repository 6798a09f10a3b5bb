"""The `models` exception tree (one base class for the package).

    ModelsError
    ├── VolumeError            a DICOM series cannot become a Volume (mixed orientation/size,
    │                          no geometry, undecodable pixels, duplicate positions, ...)
    ├── RegistryError
    │   ├── UnknownModelError  no model of that name is registered
    │   ├── WeightsMissingError the weights file (or its .sha256) is not there
    │   └── WeightsIntegrityError sha256 of the weights file differs from the recorded one
    ├── DataSpecError          a --data spec or the data it points to is malformed
    ├── TrainingError          training cannot run (no data, one class only, ...)
    ├── SuperResError          bad input for super-resolution or a bad checkpoint (a ValueError too;
    │                          `models.superres` re-exports it)
    └── PipelineError          unknown pipeline or role

The phantom generator (`models.phantoms.PhantomError`) keeps its own error; it is a ValueError too.
"""

from __future__ import annotations


class ModelsError(Exception):
    """Base of every error raised by `models`."""


class VolumeError(ModelsError, ValueError):
    """A DICOM series cannot be turned into a Volume; the message says why."""


class RegistryError(ModelsError):
    """Model registry problem."""


class UnknownModelError(RegistryError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else "unknown model"


class WeightsMissingError(RegistryError, FileNotFoundError):
    """The weights file or its recorded hash is missing."""


class WeightsIntegrityError(RegistryError):
    """The weights file does not match its recorded sha256; it is never loaded."""


class DataSpecError(ModelsError, ValueError):
    """A data spec (synthetic:N:SEED, mrnet:PATH[:SPLIT], dicomcsv:PATH) is malformed or its data is."""


class TrainingError(ModelsError):
    """Training cannot proceed."""


class SuperResError(ModelsError, ValueError):
    """Bad input for super-resolution or a bad checkpoint."""


class PipelineError(ModelsError, KeyError):
    """Unknown pipeline, or a role the pipeline does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "pipeline error"
