"""Receiving DICOM: the C-ECHO / C-STORE listener and everything on its path to the index.

- `node.receive.listener` — the listener process(es): validate, stage the raw bytes, index, answer
  with a PS3.4 status (and the parent that hands connections to several listener processes);
- `node.receive.transport` — the pynetdicom server with the fast (event-driven) transport;
- `node.receive.negotiation` — what associations may negotiate, and pynetdicom's UID checks done once;
- `node.receive.header` — header parsing and validation of one instance (no database);
- `node.receive.index` — the index rows of contract C1 (studies, series, instances, associations);
- `node.receive.writer` — `IndexWriter`, group commit of those rows for a listener process;
- `node.receive.storage` — the instance store on disk (staged, published, fsynced).
"""
