"""`DiscModel`: the loaded ``lumbar_spine.discs`` checkpoint and its inference.

Checkpoint (``msknode.discs/1``, plain tensors and values, saved/verified by `models.protocol`):
``{"format", "task", "localiser": state_dict, "grader": state_dict, "grade_temperature",
"herniation_temperature", "threshold", "min_peak", "metadata"}``.

Inference: central slice of the series -> canonical image -> localiser grid -> one heatmap per level
(spatial softmax); a level is located where its map holds at least ``min_peak`` of its mass around the
peak (else it is left out) -> a patch around each located disc (a few test-time offsets) -> calibrated
Pfirrmann probabilities and P(herniation) -> `LumbarDiscs.findings`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.discs.images import GRID, Canonical, GridMap, disc_input, to_grid, volume_midslice
from models.discs.nets import HEAT, DiscGrader, DiscLocaliser
from models.errors import RegistryError
from models.predicting import gated_predict, model_info
from models.protocol import Checkpoint, load_checkpoint, save_checkpoint
from models.tasks.spine_discs import GRADES, LEVELS, DiscResult, LumbarDiscs, median_grade
from models.types import ModelInfo, ModelOutput, QCResult, Volume

FORMAT = "msknode.discs/1"
TTA_OFFSETS_MM = ((0.0, 0.0), (-1.5, 0.0), (1.5, 0.0), (0.0, -1.5), (0.0, 1.5))


@dataclass
class Located:
    level: str
    row: float  # canonical pixel
    col: float
    score: float  # heatmap mass around the peak


def decode_heatmaps(logits: torch.Tensor, gm: GridMap, min_peak: float) -> list[Located]:
    """(5, HEAT, HEAT) logits -> the located levels (canonical pixels)."""
    out = []
    scale = GRID / HEAT
    for i, level in enumerate(LEVELS):
        p = torch.softmax(logits[i].flatten().double(), 0).view(HEAT, HEAT).numpy()
        y, x = np.unravel_index(int(np.argmax(p)), p.shape)
        y0, y1, x0, x1 = max(y - 1, 0), min(y + 2, HEAT), max(x - 1, 0), min(x + 2, HEAT)
        win = p[y0:y1, x0:x1]
        mass = float(win.sum())
        yy, xx = np.mgrid[y0:y1, x0:x1]
        cy, cx = float((win * yy).sum() / mass), float((win * xx).sum() / mass)
        gy, gx = (cy + 0.5) * scale - 0.5, (cx + 0.5) * scale - 0.5
        r, c = gm.to_canonical(gy, gx)
        if mass >= min_peak:
            out.append(Located(level, float(r), float(c), mass))
    return consistent(out, gm)


MIN_DISC_GAP_MM = 5.0  # adjacent located discs must lie at least this far apart head to feet (order and duplicates)


def consistent(located: list[Located], gm: GridMap) -> list[Located]:
    """The located levels that run head to feet in level order, at least ``MIN_DISC_GAP_MM`` apart: of two
    adjacent located levels out of order (or on top of each other), the less certain one is dropped (left
    out, never renamed)."""
    out = list(located)  # level order
    while True:
        bad = [
            (a, b)
            for a, b in itertools.pairwise(out)
            if (b.row - a.row) * gm.sr < MIN_DISC_GAP_MM * (LEVELS.index(b.level) - LEVELS.index(a.level))
        ]
        if not bad:
            return out
        a, b = bad[0]
        out.remove(a if a.score < b.score else b)


@dataclass
class DiscModel:
    task: LumbarDiscs
    localiser: DiscLocaliser
    grader: DiscGrader
    info: ModelInfo
    grade_temperature: float = 1.0
    herniation_temperature: float = 1.0
    threshold: float = 0.5
    min_peak: float = 0.1
    decode: str = "argmax"  # grade reported: "argmax" (most probable) or "median" of the grade distribution
    metadata: dict[str, Any] = field(default_factory=dict)
    gate: Any = None

    # --- persistence ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "task": self.task.name,
            "localiser": {k: v.detach().clone() for k, v in self.localiser.state_dict().items()},
            "grader": {k: v.detach().clone() for k, v in self.grader.state_dict().items()},
            "grade_temperature": float(self.grade_temperature),
            "herniation_temperature": float(self.herniation_temperature),
            "threshold": float(self.threshold),
            "min_peak": float(self.min_peak),
            "grader_channels": int(self.grader.in_channels),
            "decode": self.decode,
            "metadata": dict(self.metadata),
        }

    def save(self, path: Path) -> str:
        return save_checkpoint(self.state(), path)

    @classmethod
    def load(cls, path: Path, *, sha256: str | None = None, gate: Any = None) -> DiscModel:
        return cls.from_checkpoint(load_checkpoint(path, sha256), gate=gate)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, *, task: Any = None, gate: Any = None) -> DiscModel:
        from models.tasks.spine_discs import TASK

        data = ckpt.data
        if data.get("format") != FORMAT:
            raise RegistryError(f"{ckpt.path} is not a {FORMAT} checkpoint")
        if data.get("task") != TASK.name or (task is not None and task.name != TASK.name):
            raise RegistryError(f"{ckpt.path} holds weights of {data.get('task')!r}, not {TASK.name!r}")
        loc, grader = DiscLocaliser(), DiscGrader(in_channels=int(data.get("grader_channels", 1)))
        try:
            loc.load_state_dict(data["localiser"], strict=True)
            grader.load_state_dict(data["grader"], strict=True)
        except (RuntimeError, KeyError) as e:
            raise RegistryError(f"{ckpt.path}: weights do not fit the networks of {TASK.name}: {e}") from None
        loc.eval()
        grader.eval()
        meta = dict(data.get("metadata", {}))
        info = model_info(TASK, ckpt.sha256, meta, demo_weights=False)
        return cls(
            task=TASK,
            localiser=loc,
            grader=grader,
            info=info,
            grade_temperature=float(data.get("grade_temperature", 1.0)),
            herniation_temperature=float(data.get("herniation_temperature", 1.0)),
            threshold=float(data.get("threshold", 0.5)),
            min_peak=float(data.get("min_peak", 0.1)),
            decode=str(data.get("decode", "argmax")),
            metadata=meta,
            gate=gate,
        )

    # --- inference ------------------------------------------------------------------------------
    def locate(self, canon: Canonical) -> list[Located]:
        img, gm = to_grid(canon)
        self.localiser.eval()
        with torch.inference_mode():
            logits = self.localiser(torch.from_numpy(img)[None, None])[0]
        return decode_heatmaps(logits, gm, self.min_peak)

    def grade_logits(self, canon: Canonical, located: list[Located]) -> tuple[np.ndarray, np.ndarray]:
        """Raw (uncalibrated) logits averaged over the test-time offsets: grade (n, 5), binary (n, 3)."""
        if not located:
            return np.zeros((0, 5), np.float32), np.zeros((0, 3), np.float32)
        sr, sc = canon.spacing
        xs, lv = [], []
        for d in located:
            for dy, dx in TTA_OFFSETS_MM:
                xs.append(disc_input(canon, d.row + dy / sr, d.col + dx / sc, self.grader.in_channels))
                lv.append(LEVELS.index(d.level))
        self.grader.eval()
        with torch.inference_mode():
            g, b = self.grader(torch.from_numpy(np.stack(xs)), torch.tensor(lv))
        n, v = len(located), len(TTA_OFFSETS_MM)
        return g.view(n, v, 5).numpy(), b.view(n, v, 3).numpy()

    def analyse_canonical(self, canon: Canonical, volume: Volume | None = None) -> list[DiscResult]:
        located = self.locate(canon)
        g, b = self.grade_logits(canon, located)
        out = []
        for i, d in enumerate(located):
            pg = torch.softmax(torch.from_numpy(g[i]) / self.grade_temperature, dim=1).numpy()  # (views, 5)
            ph = 1.0 / (1.0 + np.exp(-b[i, :, 0] / self.herniation_temperature))
            loc = loc_mm = None
            if volume is not None:
                loc = canon.to_voxel(d.row, d.col)
                mm = volume.affine() @ np.array([loc[0], loc[1], loc[2], 1.0])
                loc_mm = tuple(round(float(v), 2) for v in mm[:3])
            mean = pg.mean(axis=0)
            grade = median_grade(mean) if self.decode == "median" else GRADES[int(np.argmax(mean))]
            out.append(
                DiscResult(
                    level=d.level,
                    grade=grade,
                    grade_probabilities=mean,
                    p_herniation=float(ph.mean()),
                    location=loc,
                    location_mm=loc_mm,  # type: ignore[arg-type]
                    localisation_score=d.score,
                    grade_std=float(pg[:, 2:].sum(axis=1).std()),
                    herniation_std=float(ph.std()),
                )
            )
        return out

    def analyse(self, volume: Volume, *, extras=None, saliency: bool = True, uncertainty: bool = True, timings=None):
        return self.analyse_canonical(volume_midslice(volume), volume)

    def predict(
        self,
        volume: Volume,
        *,
        extras=None,
        saliency: bool = True,
        uncertainty: bool = True,
        qc: QCResult | None = None,
    ) -> ModelOutput:
        """QC gate + localisation + grading -> ModelOutput (no findings when QC refuses the series)."""

        def analyse(timings: dict[str, float]) -> list[DiscResult]:
            t0 = time.perf_counter()
            results = self.analyse(volume)
            timings["inference_s"] = time.perf_counter() - t0
            return results

        return gated_predict(self, volume, qc, analyse)
