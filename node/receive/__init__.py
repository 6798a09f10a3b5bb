"""Receiving DICOM: the C-ECHO / C-STORE listener and everything on its path to the index.

- `node.receive.listener` — the listener process(es): validate, stage the raw bytes, index, answer
  with a PS3.4 status (and the parent that hands connections to several listener processes);
- `node.receive.transport` — the pynetdicom server with the fast (event-driven) transport;
- `node.receive.index` — header parsing and validation, the index rows of contract C1 (studies,
  series, instances, associations) and `IndexWriter`, their group commit for a listener process;
- `node.receive.storage` — the instance store on disk (staged, published, fsynced).
"""
