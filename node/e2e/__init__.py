"""The whole node end to end: an Orthanc PACS that auto-routes to msknode, the demo, the latency benchmark.

- `node.e2e.pacs` — Orthanc (Debian ``/usr/sbin/Orthanc``) as the hospital PACS, with the
  ``docker/orthanc-autoroute.lua`` rule and a reception log with microsecond timestamps;
- `node.e2e.stack` — Orthanc + ``msknode serve`` on the embedded default, started and stopped together;
- `node.e2e.cases` — the demo's phantom studies and what the shipped models should make of them;
- `node.e2e.verify` — waits for a study's results in the PACS, checks them (kinds, dciodvfy);
- `node.e2e.demo` — ``msknode demo``; `node.e2e.bench` — ``msknode bench e2e``.
"""
