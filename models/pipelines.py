"""Pipelines (contract C4): which models run for an anatomy, on which input roles.

``PIPELINES[name].models`` lists the classifiers of the pipeline that have shipped
weights in the repository (a model appears once its task code and weights land), in
report order; ``superres`` says whether the super-resolution model ships. Input roles
per model come from the task (contract C3: knee.acl <- sag_fluid, sag_pd; ...).

``run_pipeline(name, volumes, *, registry, superres=True, saliency=True)`` runs every
model of the pipeline on the first of its roles present in ``volumes`` (role -> Volume).
A model whose roles are all missing gets a `ModelOutput` with ``qc.accepted=False`` and
reason "missing_series" — never silence. Super-resolution runs on the main model's
input series when that series passed the main model's QC gate; `run_superres` is that step alone, so a
caller can run the findings first (``superres=False``), publish them, and super-resolve afterwards. The level segmentation
(``PipelineSpec.levels``, lumbar spine) runs on the first of its roles present; its disc
centres place the level findings of `PLACED_BY_LEVELS` on the same series. Torch threads are set
by the caller.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from models.errors import PipelineError
from models.qc import REASONS
from models.registry import ENTRIES, MODEL_SUPERRES, REPO_WEIGHTS, Registry
from models.tasks import TASKS
from models.types import LevelsOutput, ModelOutput, PipelineOutput, QCResult, SuperResOutput, Volume

ROLES: dict[str, tuple[str, ...]] = {
    "knee": ("sag_fluid", "sag_pd", "cor_fluid", "cor_t1", "ax_fluid", "localizer"),
    "shoulder": ("cor_fluid", "cor_t1", "sag_fluid", "ax_fluid", "localizer"),
    "lumbar_spine": ("sag_t2", "sag_t1", "sag_stir", "ax_t2", "localizer"),
}
CANDIDATES: dict[str, tuple[str, ...]] = {
    "knee": ("knee.acl", "knee.meniscus"),
    "shoulder": ("shoulder.rotator_cuff",),
    "lumbar_spine": ("lumbar_spine.stenosis", "lumbar_spine.discs"),
}
# the vertebra / disc segmentation of an anatomy (runs on the first of its roles present, e.g. sag_t2, sag_t1,
# sag_stir), and the models whose level findings it places (their grades are theirs; the location of each
# level's finding becomes the segmented disc centre of that level, on the same series): measured on held-out
# real volumes (models/weights/lumbar_spine.levels/MODEL_CARD.md, "stenosis_levels")
LEVELS: dict[str, str] = {"lumbar_spine": "lumbar_spine.levels"}
PLACED_BY_LEVELS: tuple[str, ...] = ("lumbar_spine.stenosis",)


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    anatomy: str
    models: tuple[str, ...]  # classifiers with shipped weights, report order
    roles: tuple[str, ...]  # every role the pipeline knows (routing output)
    superres: bool  # the super-resolution model ships
    model_roles: dict[str, tuple[str, ...]]  # model -> input roles, preference order
    levels: str | None = None  # the level segmentation model, when its weights ship

    @property
    def main_model(self) -> str | None:
        return self.models[0] if self.models else None

    @property
    def superres_roles(self) -> tuple[str, ...]:
        """Roles super-resolution may take: the first input role(s) of the main model."""
        main = self.main_model
        if main is not None:
            return self.model_roles[main]
        cands = [m for m in CANDIDATES[self.anatomy] if m in TASKS]
        return TASKS[cands[0]].input.roles if cands else ()


def _shipped(name: str) -> bool:
    e = ENTRIES.get(name)
    return e is not None and (REPO_WEIGHTS / name / e.weights_file).is_file()


def _build() -> dict[str, PipelineSpec]:
    out = {}
    for anatomy, cands in CANDIDATES.items():
        models = tuple(m for m in cands if m in TASKS and _shipped(m))
        out[anatomy] = PipelineSpec(
            name=anatomy,
            anatomy=anatomy,
            models=models,
            roles=ROLES[anatomy],
            superres=_shipped(MODEL_SUPERRES),
            model_roles={m: TASKS[m].input.roles for m in cands if m in TASKS},
            levels=LEVELS[anatomy] if anatomy in LEVELS and _shipped(LEVELS[anatomy]) else None,
        )
    return out


PIPELINES: dict[str, PipelineSpec] = _build()


def _missing(registry: Registry, model: str, roles: tuple[str, ...]) -> ModelOutput:
    msg = f"{REASONS['missing_series']}: {model} needs one of {', '.join(roles)}"
    return ModelOutput(
        model=registry.info(model), series_uid="", qc=QCResult(False, "missing_series", msg), findings=[]
    )


def run_pipeline(
    name: str,
    volumes: Mapping[str, Volume],
    *,
    registry: Registry,
    superres: bool = True,
    saliency: bool = True,
    levels: bool = True,
) -> PipelineOutput:
    """Run pipeline ``name`` on role -> Volume; see the module docstring."""
    if name not in PIPELINES:
        raise PipelineError(f"unknown pipeline {name!r}; known: {', '.join(sorted(PIPELINES))}")
    spec = PIPELINES[name]
    unknown = sorted(set(volumes) - set(spec.roles))
    if unknown:
        raise PipelineError(f"pipeline {name!r} has no role(s) {', '.join(unknown)}; roles: {', '.join(spec.roles)}")
    t_start = time.perf_counter()
    outputs: list[ModelOutput] = []
    used: dict[str, list[str]] = {}
    timings: dict[str, float] = {}
    qc_by_series: dict[str, QCResult] = {}
    for model_name in spec.models:
        roles = spec.model_roles[model_name]
        role = next((r for r in roles if r in volumes), None)
        t0 = time.perf_counter()
        if role is None:
            outputs.append(_missing(registry, model_name, roles))
            continue
        vol = volumes[role]
        extras = {r: volumes[r] for r in TASKS[model_name].input.extra_roles if r in volumes}
        out = registry.get(model_name).predict(vol, extras=extras, saliency=saliency)
        outputs.append(out)
        used[model_name] = [vol.series_uid] + [v.series_uid for v in extras.values() if out.qc.accepted]
        if model_name == spec.main_model:
            qc_by_series[vol.series_uid] = out.qc
        timings[model_name] = time.perf_counter() - t0
    level_outputs: list[LevelsOutput] = []
    if levels and spec.levels is not None:
        model = registry.get(spec.levels)
        role = next((r for r in model_input_roles(spec.levels) if r in volumes), None)
        if role is not None:
            t0 = time.perf_counter()
            lv = model.predict(volumes[role])
            level_outputs.append(lv)
            if lv.qc.accepted:
                used[spec.levels] = [lv.series_uid]
                place_levels(outputs, lv)
            timings[spec.levels] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    output = PipelineOutput(
        pipeline=name, outputs=outputs, superres=[], used_series=used, timings=timings, levels=level_outputs
    )
    return run_superres(output, volumes, registry=registry) if superres else output


def run_superres(output: PipelineOutput, volumes: Mapping[str, Volume], *, registry: Registry) -> PipelineOutput:
    """The second stage of a pipeline: super-resolution of the main model's input series, added to ``output``
    (the findings of `run_pipeline` with ``superres=False``, on the same ``volumes``).

    The series is taken when it passed the main model's QC gate (the gate is asked when the main model did
    not read it); a refused series gets a `SuperResOutput` with that QC result and no new volume. ``output``
    is returned unchanged when the pipeline has no super-resolution or none of its roles is present."""
    spec = PIPELINES[output.pipeline]
    if not spec.superres:
        return output
    role = next((r for r in spec.superres_roles if r in volumes), None)
    if role is None:
        return output
    vol = volumes[role]
    t0 = time.perf_counter()
    qc = next(
        (mo.qc for mo in output.outputs if mo.model.name == spec.main_model and mo.series_uid == vol.series_uid),
        None,
    )
    if qc is None and spec.main_model is not None:
        qc = registry.gate().check(vol, TASKS[spec.main_model])
    model = registry.get(MODEL_SUPERRES)
    used = dict(output.used_series)
    if qc is not None and not qc.accepted:
        from models.superres import CONSISTENCY_TOLERANCE

        sr = SuperResOutput(
            model=model.info,
            source=vol,
            volume=vol,
            qc=qc,
            consistency_error=float("nan"),
            consistency_tolerance=CONSISTENCY_TOLERANCE,
            consistency_passed=False,
            timings={},
        )
    else:
        sr = model.predict(vol)
        used[MODEL_SUPERRES] = [vol.series_uid]
    timings = dict(output.timings or {})
    timings[MODEL_SUPERRES] = time.perf_counter() - t0
    if "total" in timings:
        timings["total"] += timings[MODEL_SUPERRES]
    return replace(output, superres=[*output.superres, sr], used_series=used, timings=timings)


def model_input_roles(name: str) -> tuple[str, ...]:
    return ENTRIES[name].input_roles


def place_levels(outputs: list[ModelOutput], levels: LevelsOutput) -> int:
    """The location of each level finding of the `PLACED_BY_LEVELS` models on the levels' own series becomes the
    segmented centre of that disc (voxel and patient mm); grades, probabilities and heatmaps stay the model's.
    Returns how many findings were placed."""
    placed = 0
    for mo in outputs:
        if mo.model.name not in PLACED_BY_LEVELS or mo.series_uid != levels.series_uid or not mo.qc.accepted:
            continue
        for f in mo.findings:
            if f.level and f.level in levels.centres_vox:
                f.location = levels.centres_vox[f.level]
                f.location_mm = levels.centres_mm[f.level]
                placed += 1
    return placed
