"""The ``lumbar_spine.discs`` model: 2-D disc localiser + disc grader on the mid-sagittal slice.

- `models.discs.images`: the canonical mid-sagittal image (head at the top, anterior at the left, mm
  spacing) from a `Volume` or a SPIDER PNG; the localiser grid and the per-disc patches;
- `models.discs.spider`: the ``spider:PATH`` data (SPIDER mid-sagittal layout): patients, gradings,
  disc centres from the training crops, the patient-level split;
- `models.discs.nets`: `DiscLocaliser` (one heatmap per level) and `DiscGrader` (Pfirrmann + herniation);
- `models.discs.model`: `DiscModel`, the loaded checkpoint (``msknode.discs/1``) and its inference;
- `models.discs.training` / `models.discs.evaluation`: ``msknode train`` / ``msknode evaluate``.
"""
