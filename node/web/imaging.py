"""Pixels for the study viewer: original slices, the AI overlay from the SEG, super-resolved slices.

Originals are decoded from the stored files (``models.io.load_series`` when it is
installed, otherwise pydicom directly), sorted by position along the slice normal. The
overlay is the job's fractional SEG (highdicom), mapped onto the original slices by the
source SOP Instance UID each SEG frame references, or by plane position when a SEG has
no per-frame references. Decoded stacks are kept in a small LRU cache owned by the app.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from node.errors import NodeError


class ImagingError(NodeError):
    """A stored series or result object cannot be shown (the message says why)."""


@dataclass
class SliceStack:
    array: np.ndarray  # (slices, rows, cols) float32
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int | None, ...]
    positions: np.ndarray | None  # (slices, 3) or None
    normal: np.ndarray | None
    window: tuple[float, float] = (0.0, 1.0)
    series_uid: str = ""

    @property
    def n(self) -> int:
        return int(self.array.shape[0])

    def projections(self) -> np.ndarray | None:
        if self.positions is None or self.normal is None:
            return None
        return np.asarray(self.positions, dtype=float) @ np.asarray(self.normal, dtype=float)


@dataclass
class Overlay:
    array: np.ndarray  # (slices, rows, cols) float32 in [0, 1], aligned with a SliceStack
    segments: list[dict] = field(default_factory=list)
    per_segment: dict[int, np.ndarray] = field(default_factory=dict)
    method: str = "source_instance"


def _window(a: np.ndarray) -> tuple[float, float]:
    sample = a[:: max(1, a.shape[0] // 8)].ravel()
    if sample.size > 400_000:
        sample = sample[:: sample.size // 400_000]
    lo, hi = np.percentile(sample, [0.5, 99.5]) if sample.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _floats(v) -> list[float]:
    return [float(x) for x in v]


def _load_with_pydicom(paths: Sequence[str | Path]) -> SliceStack:
    import pydicom

    # (array2d, sop, frame, position, orientation, instance number)
    items: list[tuple[np.ndarray, str, int | None, list[float] | None, list[float] | None, int]] = []
    for p in paths:
        try:
            ds = pydicom.dcmread(str(p))
            px = ds.pixel_array
        except Exception as e:  # broad on purpose: any decoder failure becomes one clear message
            raise ImagingError(f"{Path(p).name}: cannot decode pixel data ({type(e).__name__}: {e})") from None
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        sop = str(ds.SOPInstanceUID)
        if frames > 1:
            shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
            per = ds.get("PerFrameFunctionalGroupsSequence", [])
            for i in range(frames):
                pos = ori = None
                fg = per[i] if i < len(per) else None
                for grp in (fg, shared):
                    if grp is None:
                        continue
                    if pos is None and "PlanePositionSequence" in grp:
                        pos = _floats(grp.PlanePositionSequence[0].ImagePositionPatient)
                    if ori is None and "PlaneOrientationSequence" in grp:
                        ori = _floats(grp.PlaneOrientationSequence[0].ImageOrientationPatient)
                    if "PixelValueTransformationSequence" in grp:
                        t = grp.PixelValueTransformationSequence[0]
                        slope = float(getattr(t, "RescaleSlope", slope) or slope)
                        intercept = float(getattr(t, "RescaleIntercept", intercept) or intercept)
                items.append((px[i].astype(np.float32) * slope + intercept, sop, i + 1, pos, ori, i + 1))
        else:
            pos = _floats(ds.ImagePositionPatient) if "ImagePositionPatient" in ds else None
            ori = _floats(ds.ImageOrientationPatient) if "ImageOrientationPatient" in ds else None
            arr = px.astype(np.float32)
            if arr.ndim == 3:  # colour: show luminance
                arr = arr.mean(axis=-1)
            items.append((arr * slope + intercept, sop, None, pos, ori, int(getattr(ds, "InstanceNumber", 0) or 0)))
    if not items:
        raise ImagingError("the series has no stored instances")
    shapes = {it[0].shape for it in items}
    if len(shapes) > 1:
        raise ImagingError(f"the series mixes image sizes {sorted(shapes)}; it cannot be shown as one stack")
    ori = next((it[4] for it in items if it[4] is not None), None)
    normal = np.cross(ori[:3], ori[3:]) if ori is not None else None
    if normal is not None and all(it[3] is not None for it in items):
        # every position is set (checked above)
        items.sort(key=lambda it: float(np.dot(cast("list[float]", it[3]), normal)))
        positions = np.array([it[3] for it in items], dtype=float)
    else:
        items.sort(key=lambda it: (it[5], it[2] or 0))
        positions = None
    array = np.stack([it[0] for it in items]).astype(np.float32)
    return SliceStack(
        array=array,
        sop_instance_uids=tuple(it[1] for it in items),
        frame_numbers=tuple(it[2] for it in items),
        positions=positions,
        normal=normal,
        window=_window(array),
    )


def load_stack(paths: Sequence[str | Path]) -> SliceStack:
    """Decodes a stored series into a display stack, sorted by position along the normal."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise ImagingError(f"{len(missing)} stored file(s) of the series are missing (e.g. {Path(missing[0]).name})")
    try:
        from models.io import load_series
    except ImportError:
        return _load_with_pydicom(paths)
    try:
        vol = load_series([Path(p) for p in paths])
    except Exception as e:  # broad on purpose: models.errors.VolumeError and decoder errors
        raise ImagingError(str(e)) from None
    array = np.asarray(vol.array, dtype=np.float32)
    return SliceStack(
        array=array,
        sop_instance_uids=tuple(vol.sop_instance_uids),
        frame_numbers=tuple(vol.frame_numbers) if vol.frame_numbers else (None,) * array.shape[0],
        positions=np.asarray(vol.positions, dtype=float) if vol.positions is not None and len(vol.positions) else None,
        normal=np.asarray(vol.normal, dtype=float),
        window=_window(array),
        series_uid=vol.series_uid,
    )


# ---- SEG overlay -------------------------------------------------------------------------


def _segments(seg) -> list[dict]:
    out = []
    for item in seg.SegmentSequence:
        prop = (
            item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning if "SegmentedPropertyTypeCodeSequence" in item else ""
        )
        out.append(
            {
                "number": int(item.SegmentNumber),
                "label": str(item.get("SegmentLabel", "") or prop or f"segment {item.SegmentNumber}"),
                "property": str(prop),
                "algorithm": str(item.get("SegmentAlgorithmName", "") or ""),
            }
        )
    return out


def _seg_by_source(seg, stack: SliceStack, numbers: list[int]) -> np.ndarray:
    refs = {sop for _, _, sop in seg.get_source_image_uids()}
    out = np.zeros(stack.array.shape + (len(numbers),), dtype=np.float32)
    multiframe = any(f is not None for f in stack.frame_numbers)
    if multiframe:
        by_sop: dict[str, list[tuple[int, int]]] = {}
        for k, (sop, fr) in enumerate(zip(stack.sop_instance_uids, stack.frame_numbers)):
            if sop in refs:
                by_sop.setdefault(sop, []).append((k, fr or 1))
        if not by_sop:
            raise ImagingError("the SEG references none of this series' images")
        for sop, pairs in by_sop.items():
            px = seg.get_pixels_by_source_frame(
                sop,
                [fr for _, fr in pairs],
                segment_numbers=numbers,
                assert_missing_frames_are_empty=True,
                rescale_fractional=True,
                dtype=np.float32,
            )
            for (k, _), frame in zip(pairs, px):
                out[k] = frame
        return out
    idx = [k for k, sop in enumerate(stack.sop_instance_uids) if sop in refs]
    if not idx:
        raise ImagingError("the SEG references none of this series' images")
    px = seg.get_pixels_by_source_instance(
        [stack.sop_instance_uids[k] for k in idx],
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
        rescale_fractional=True,
        dtype=np.float32,
    )
    for k, frame in zip(idx, px):
        out[k] = frame
    return out


def _seg_by_position(seg, stack: SliceStack, numbers: list[int]) -> np.ndarray:
    proj = stack.projections()
    if proj is None:
        raise ImagingError("neither source references nor positions let the SEG be placed on this series")
    out = np.zeros(stack.array.shape + (len(numbers),), dtype=np.float32)
    tol = float(np.median(np.abs(np.diff(proj)))) / 2 if len(proj) > 1 else 1.0
    max_value = float(getattr(seg, "MaximumFractionalValue", 1) or 1)
    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]

    def item(fg, keyword):
        for grp in (fg, shared):
            if grp is not None and keyword in grp:
                return grp[keyword].value[0]
        return None

    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        plane, ident = item(fg, "PlanePositionSequence"), item(fg, "SegmentIdentificationSequence")
        if plane is None:
            raise ImagingError("the SEG frames carry neither source references nor plane positions")
        pos = np.array(_floats(plane.ImagePositionPatient))
        number = int(ident.ReferencedSegmentNumber) if ident is not None else numbers[0]
        if number not in numbers:
            continue
        d = np.abs(proj - float(pos @ stack.normal))
        k = int(np.argmin(d))
        if d[k] <= max(tol, 1e-3) and frames[i].shape == stack.array.shape[1:]:
            value = frames[i].astype(np.float32)
            if seg.SegmentationType == "FRACTIONAL":
                value = value / max_value
            out[k, :, :, numbers.index(number)] = np.maximum(out[k, :, :, numbers.index(number)], value)
    return out


def load_overlay(seg_path: str | Path, stack: SliceStack) -> Overlay:
    """The SEG's segments as float maps on the slices of `stack` (max over segments in ``array``)."""
    import highdicom as hd

    if not Path(seg_path).exists():
        raise ImagingError(f"the SEG file {Path(seg_path).name} is missing from the results store")
    try:
        seg = hd.seg.segread(str(seg_path))
    except Exception as e:
        raise ImagingError(f"cannot read the SEG: {e}") from None
    segments = _segments(seg)
    numbers = [s["number"] for s in segments]
    method = "source_instance"
    try:
        maps = _seg_by_source(seg, stack, numbers)
    except Exception:  # broad on purpose: fall back to geometry
        maps = _seg_by_position(seg, stack, numbers)
        method = "plane_position"
    maps = np.clip(maps, 0.0, 1.0)
    return Overlay(
        array=maps.max(axis=-1) if maps.shape[-1] else np.zeros(stack.array.shape, np.float32),
        segments=segments,
        per_segment={n: maps[..., i] for i, n in enumerate(numbers)},
        method=method,
    )


def slice_map(source: SliceStack, target: SliceStack) -> list[int]:
    """For each slice of `source`, the nearest slice of `target` (by position, else by fraction)."""
    ps, pt = source.projections(), target.projections()
    if ps is not None and pt is not None:
        return [int(np.argmin(np.abs(pt - p))) for p in ps]
    if source.n <= 1:
        return [0] * source.n
    return [round(k * (target.n - 1) / (source.n - 1)) for k in range(source.n)]


# ---- PNG ---------------------------------------------------------------------------------


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def gray_png(stack: SliceStack, k: int) -> bytes:
    from PIL import Image

    lo, hi = stack.window
    a = np.clip((stack.array[k] - lo) / (hi - lo), 0.0, 1.0)
    return _png(Image.fromarray((a * 255).astype(np.uint8), mode="L"))


def _heat_lut() -> np.ndarray:
    """256 x 3 colour map: dark red -> red -> orange -> yellow -> white."""
    anchors = np.array(
        [[0.0, 80, 0, 0], [0.35, 220, 20, 0], [0.65, 255, 140, 0], [0.85, 255, 230, 40], [1.0, 255, 255, 220]]
    )
    x = np.linspace(0, 1, 256)
    return np.stack([np.interp(x, anchors[:, 0], anchors[:, c]) for c in (1, 2, 3)], axis=1).astype(np.uint8)


def heat_png(heat: np.ndarray, *, floor: float = 0.05) -> bytes:
    """An RGBA PNG of a [0, 1] map: colour by value, transparent below `floor`."""
    from PIL import Image

    h = np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    rgb = _heat_lut()[(h * 255).astype(np.uint8)]
    alpha = np.where(h >= floor, np.clip((h - floor) / (1 - floor), 0, 1) ** 0.6 * 235, 0).astype(np.uint8)
    return _png(Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"))


# ---- cache -----------------------------------------------------------------------------


class ImageCache:
    """A small thread-safe LRU of decoded stacks and overlays, owned by one app instance."""

    def __init__(self, max_items: int = 8):
        self.max_items = max_items
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key_for(kind: str, paths: Sequence[str | Path], extra: str = "") -> tuple:
        stamps = []
        for p in paths:
            try:
                st = Path(p).stat()
                stamps.append((str(p), st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append((str(p), 0, 0))
        return (kind, tuple(stamps), extra)

    def get(self, key: tuple, build: Callable[[], object]):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return value
