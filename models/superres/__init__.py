"""Residual, data-consistent super-resolution (``superres``).

Through-plane ×2 (in-plane ×2 on request) for 2D multislice MR series:

1. *Interpolated input* ``U(y)``: the smoothest volume on the fine grid whose
   degradation is exactly the input (minimum second difference along the slice
   axis subject to ``S x = y``; one small matrix per slice count). In-plane ×2
   adds cubic interpolation whose low k-space is replaced by the input's.
2. *Learned detail*: a small 2.5D MONAI CNN (`SlabSRNet`) looks at each input
   slice with its neighbours (a slab) plus its interpolated sub-slices and
   predicts a residual for the ``f`` sub-slices of that slice. A per-series
   share of it (`SuperResModel.detail_gain`, 0..1) is checked on the series
   itself (degraded once more), so data unlike the training phantoms gets less.
3. *Data-consistency projection*: ``x ← x + B(y − A x)`` with the documented
   degradation operator ``A`` (`models.degradation`) and its right inverse ``B``.
   Because the projection is the last step, ``A(output) = input`` holds by
   construction up to float32 rounding; the error is still measured for every
   series and reported against ``CONSISTENCY_TOLERANCE``.

The output is therefore ``U(y) + (I − BA)·detail``: the input is never replaced,
the network can only add what the input cannot see (the null space of ``A``), and
with zero detail the output equals the interpolated input. The source series is
never modified; a new `Volume` with the new geometry is returned.

The package keeps inference apart from training:

- `net`: the configuration, the network and the linear pieces (interpolated input, projection)
  that training and inference share;
- `inference`: `SuperResModel` (checkpoint through `models.protocol`, per-series calibration,
  projection, geometry of the new series), in-plane upsampling; re-exported here;
- `quality`: foreground PSNR / SSIM and the evaluation against tricubic;
- `data`: truth volumes and degraded cases (phantoms, real MR), the training seeds;
- `training`: the training loop and the recipes (phantoms; real MR + phantoms, `train_mix_to`), imported
  only to train;
- `loso`: leave-one-source-out on real MR (fold weights vs the current weights vs tricubic);
- ``python -m models.superres train|evaluate|loso`` (`__main__`).
"""

from models.errors import SuperResError
from models.superres.inference import (
    CALIBRATION_WINDOW,
    CHUNK_SLICES,
    CONSISTENCY_TOLERANCE,
    FORMAT,
    MODEL_NAME,
    NONNEG_ITERATIONS,
    WEIGHTS_PATH,
    SuperResModel,
    inplane_upsample,
    superres_geometry,
)
from models.superres.net import SlabSRNet, SuperResConfig

__all__ = [
    "CALIBRATION_WINDOW",
    "CHUNK_SLICES",
    "CONSISTENCY_TOLERANCE",
    "FORMAT",
    "MODEL_NAME",
    "NONNEG_ITERATIONS",
    "WEIGHTS_PATH",
    "SlabSRNet",
    "SuperResConfig",
    "SuperResError",
    "SuperResModel",
    "inplane_upsample",
    "superres_geometry",
]
