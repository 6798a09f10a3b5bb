"""msknode: the DICOM-facing service — listener, storage, completeness, routing,
Celery tasks, result writers, dispatch, web app and command line."""

__version__ = "0.1.0"
