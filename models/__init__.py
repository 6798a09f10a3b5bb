"""Everything ML: volumes, transforms, networks, task heads, QC gate, saliency,
phantoms, training/evaluation and the model registry. Never imports `node`."""
