"""Helpers shared by the tests (imported as ``support.<module>``; ``tests/`` is on ``sys.path``).

- `support.env`: the checkout root, the venv's ``bin``, free ports, an environment without the
  caller's ``MSKNODE_*`` settings.
- `support.mr`: the one factory for MR Image Storage data sets and series written as files.
- `support.servers`: real servers for the tests (PostgreSQL, Redis), the registry that stops every
  server a test started (fixture finalizer, ``atexit``) and the detector of leaked processes that
  fails the run at session end.
- `support.listener`: ``msknode listen`` in a subprocess and a client that sends raw data set bytes.
- `support.jobs`: rows for a study with a job, a sleeping job runner, worker/listener processes.
- `support.orthanc`: real Orthanc instances as the PACS (with DICOMweb, or plain).
- `support.index_rows`: the index rows (contract C1) written the way the listener writes them.
- `support.volumes`: volumes as MR series; the MNI152 brain as a volume.
- `support.results_data`: inputs for the results tests (series, vendor files, model outputs).
- `support.web_seed`: a node database seeded with studies, results and worklist entries.
- `support.browser`: ``msknode web`` in a subprocess and headless Chromium driven by Selenium.
- `support.web_client`: the web app in process (Starlette's TestClient): login, bearer token, CSRF token.
- `support.node_stack`: the production ``msknode worker``, the environment the node's processes share
  in end-to-end tests, a knee study to send (phantom or the real Siemens series), a study's job.
"""
