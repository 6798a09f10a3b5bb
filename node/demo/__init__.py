"""Demo and benchmark tooling: the whole node end to end, and the loopback helpers they (and tests) use.

- `node.demo.orthanc` — an Orthanc process (Debian ``/usr/sbin/Orthanc``) on loopback ports;
- `node.demo.pacs` — Orthanc as the hospital PACS, with the ``docker/orthanc-autoroute.lua``
  rule and a reception log with microsecond timestamps;
- `node.demo.stack` — Orthanc + ``msknode serve`` on the embedded default, started and stopped together;
- `node.demo.cases` — the demo's phantom studies and what the shipped models should make of them;
- `node.demo.verify` — waits for a study's results in the PACS, checks them (kinds, dciodvfy);
- `node.demo.run_demo` — ``msknode demo``;
- `node.demo.bench_e2e` — ``msknode bench e2e``; `node.demo.bench_ingest` — ``msknode bench ingest``;
- `node.demo.loopback` — free ports, ``echoscu``, the environment of a started child process.
"""
