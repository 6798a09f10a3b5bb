"""Command line: ``msknode models list``, ``train``, ``evaluate``, ``predict``.

Handlers are ``func(args, settings) -> exit code``; ``settings`` is used duck-typed
(``weights_dir``, ``torch_threads``) so `models` never imports `node`. Bad input gives a
non-zero exit code and a one-line message on stderr.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3  # weights missing or failing their integrity check
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) during training: rerun the command to resume


def register(sub) -> None:
    p = sub.add_parser("models", help="model registry (cards, weights, hashes)")
    msub = p.add_subparsers(dest="models_command", metavar="COMMAND")
    msub.required = True
    pl = msub.add_parser("list", help="model cards: task, anatomy, input, version, weights sha256, metrics")
    pl.add_argument("--json", action="store_true", help="print a JSON list")
    pl.set_defaults(func=cmd_list)

    pt = sub.add_parser("train", help="train a model on a data spec")
    pt.add_argument("model", help="model name, e.g. knee.acl (or qc.anatomy, superres)")
    pt.add_argument("--data", required=True, help="synthetic:N:SEED | mrnet:PATH[:SPLIT] | dicomcsv:PATH | images:PATH")
    pt.add_argument("--out", required=True, type=Path, help="output folder (weights, sha256, recipe, log)")
    pt.add_argument("--epochs", type=int, default=None)
    pt.add_argument("--batch-size", type=int, default=16)
    pt.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default 2e-3; superres fine-tuning from --init: 5e-4)",
    )
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--workers", type=int, default=1, help="processes generating phantoms")
    pt.add_argument("--cache", type=Path, default=None, help="folder caching preprocessed phantoms")
    pt.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    pt.add_argument(
        "--steps-per-epoch", type=int, default=None, help="lumbar_spine.levels: optimiser steps per epoch (150)"
    )
    pt.add_argument("--no-augment", action="store_true")
    pt.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr (the JSON log lines stay on stdout)"
    )
    pt.add_argument(
        "--patch-steps",
        type=int,
        default=None,
        help="lesion-patch pretraining steps before the whole-grid epochs (default: the model's own)",
    )
    pt.add_argument(
        "--patch-lr", type=float, default=None, help="peak learning rate of the patch stage (default: --lr)"
    )
    pt.add_argument(
        "--init",
        default=None,
        help="start from these weights (with .sha256), e.g. to fine-tune; 'registry': the weights the registry "
        "holds for the model (the site's weights folder, else the shipped ones)",
    )
    pt.add_argument(
        "--motion",
        default="1200:3500000",
        help="qc.anatomy only: N:SEED phantoms for the native-resolution motion detector (default 1200:3500000)",
    )
    pt.add_argument(
        "--realdata",
        default="auto",
        help="qc.anatomy only: the real corpus (PATH, 'auto' = MSKNODE_REALDATA or ../shared/realdata, "
        "'none' = phantoms only)",
    )
    pt.add_argument(
        "--exclude-source",
        action="append",
        default=[],
        metavar="SOURCE",
        help="qc.anatomy only: leave this real source out (repeatable; see models.realdata.SOURCES)",
    )
    pt.add_argument(
        "--no-loso-rule",
        action="store_true",
        help="qc.anatomy only: keep the default thresholds instead of calibrating them leave-one-source-"
        "out (which trains, or reuses from the cache, one model per real source)",
    )
    pt.add_argument(
        "--resume",
        action="store_true",
        help="superres only: continue the run in --out from its last epoch (train_state.pt)",
    )
    pt.add_argument(
        "--phantoms",
        type=int,
        default=None,
        help="superres with --data realdata:PATH: phantoms mixed with the real volumes (default 40)",
    )
    pt.set_defaults(func=cmd_train)

    pe = sub.add_parser("evaluate", help="evaluate a model on a data spec (metrics with 95%% bootstrap CIs)")
    pe.add_argument("model")
    pe.add_argument(
        "--data",
        required=True,
        help="synthetic:N:SEED | mrnet:PATH[:SPLIT] | dicomcsv:PATH | images:PATH | realdir:PATH",
    )
    pe.add_argument(
        "--weights", type=Path, default=None, help="a checkpoint (with its .sha256) instead of the registry's"
    )
    pe.add_argument(
        "--compare",
        default=None,
        metavar="WEIGHTS|registry",
        help="also evaluate these weights ('registry': the registry's) on the same cases and report both and "
        "the differences (new = --weights)",
    )
    pe.add_argument("--workers", type=int, default=1, help="processes generating phantoms")
    pe.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    pe.add_argument("--json", action="store_true", help="print one JSON object")
    pe.add_argument(
        "--loso",
        action="store_true",
        help="qc.anatomy on realdata:PATH: also leave-one-source-out (one training per real source)",
    )
    pe.set_defaults(func=cmd_evaluate)

    pp = sub.add_parser("predict", help="QC gate + models on the DICOM series under a folder")
    pp.add_argument("dicom_dir", type=Path)
    pp.add_argument("--model", default=None, help="run only this model (default: the anatomy's pipeline)")
    pp.add_argument("--no-saliency", action="store_true")
    pp.add_argument("--json", action="store_true", help="print one JSON object")
    pp.set_defaults(func=cmd_predict)


def _err(msg: str) -> None:
    print(f"msknode: {msg}", file=sys.stderr)


def _threads(settings) -> int:
    return int(getattr(settings, "torch_threads", 2) or 2)


def _registry(settings):
    from models.registry import Registry

    return Registry(getattr(settings, "weights_dir", None))


# --- readable output ----------------------------------------------------------------------------


def readable(value: Any, indent: int = 0, width: int = 100) -> list[str]:
    """Text lines for a JSON-like value: ``key: value`` per line, nested mappings indented, short lists inline,
    numbers rounded; never a Python repr (``--json`` prints the JSON)."""
    pad = "  " * indent

    def scalar(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    def inline(v: Any) -> str | None:
        if isinstance(v, dict):
            if all(not isinstance(x, (dict, list, tuple)) for x in v.values()):
                text = ", ".join(f"{k} {scalar(x)}" for k, x in v.items())
                return text if len(text) <= width else None
            return None
        if isinstance(v, (list, tuple)):
            if all(not isinstance(x, (dict, list, tuple)) for x in v):
                text = "[" + ", ".join(scalar(x) for x in v) + "]"
                return text if len(text) <= width else None
            return None
        return scalar(v)

    lines: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            one = inline(v)
            if one is not None:
                lines.append(f"{pad}{k}: {one}")
            elif isinstance(v, dict):
                lines.append(f"{pad}{k}:")
                lines += readable(v, indent + 1, width)
            else:
                lines.append(f"{pad}{k}: ({len(v)})")
                for x in v:
                    sub = readable(x, indent + 2, width)
                    if sub:
                        lines.append(f"{pad}  - " + sub[0].strip())
                        lines += sub[1:]
    elif isinstance(value, (list, tuple)):
        for x in value:
            lines.append(f"{pad}- {inline(x) or ''}")
    else:
        lines.append(f"{pad}{scalar(value)}")
    return lines


# --- models list --------------------------------------------------------------------------------


def cmd_list(args, settings) -> int:
    cards = _registry(settings).list()
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    for c in cards:
        print(f"{c['name']}  [{c['task']}, {c['anatomy']}]  version {c['version']}  {c['status']}")
        print(f"    {c['description']}")
        roles = ", ".join(c["input_roles"]) or "-"
        print(f"    input roles: {roles}")
        print(f"    weights: {c['weights_path'] or '-'}")
        print(f"    sha256: {c['weights_sha256'] or '-'}")
        if c.get("error"):
            print(f"    REFUSED: {c['error']}")
        for label, key in (("training data", "training_data"), ("metrics", "metrics")):
            v = c.get(key)
            if not v:
                continue
            if isinstance(v, dict):
                print(f"    {label}:")
                print("\n".join(readable(v, indent=3)))
            else:
                print(f"    {label}: {v}")
        print(f"    {c['notice']}")
    return 0


# --- train ------------------------------------------------------------------------------------------


def cmd_train(args, settings) -> int:
    import torch

    from models.data import parse_spec
    from models.errors import DataSpecError, TrainingError, VolumeError
    from models.registry import ENTRIES, MODEL_ANATOMY, MODEL_LEVELS, MODEL_SUPERRES

    torch.set_num_threads(_threads(settings))
    if args.model not in ENTRIES:
        _err(f"unknown model {args.model!r}; known: {', '.join(sorted(ENTRIES))}")
        return EXIT_BAD_INPUT
    try:
        spec = parse_spec(args.data)
    except DataSpecError as e:
        _err(str(e))
        return EXIT_BAD_INPUT
    log = lambda m: print(m, flush=True)  # noqa: E731
    try:
        if args.model == MODEL_ANATOMY:
            if spec.kind != "synthetic":
                _err(
                    "qc.anatomy trains on --data synthetic:N:SEED (phantoms and synthetic other anatomy) plus "
                    "--realdata PATH|auto|none (real MRI)"
                )
                return EXIT_BAD_INPUT
            from models.qc_training import Recipe, set_loso_rule, train_anatomy, train_motion_detector
            from models.realdata import SOURCES, realdata_root

            try:
                motion_n, motion_seed = (int(v) for v in str(args.motion).split(":"))
            except ValueError:
                _err(f"--motion {args.motion!r}: expected N:SEED, e.g. 1200:3500000")
                return EXIT_BAD_INPUT
            bad = [s for s in args.exclude_source if s not in SOURCES]
            if bad:
                _err(f"--exclude-source {', '.join(bad)}: known sources {', '.join(SOURCES)}")
                return EXIT_BAD_INPUT
            use_real = args.realdata != "none"
            root = None
            if use_real:
                root = realdata_root() if args.realdata == "auto" else Path(args.realdata)
                if root is None or not root.is_dir():
                    _err(
                        f"--realdata {args.realdata}: the real corpus was not found (MSKNODE_REALDATA, "
                        "../shared/realdata beside the checkout); --realdata none trains on phantoms only"
                    )
                    return EXIT_BAD_INPUT
            recipe = Recipe(phantoms=spec.n, seed=spec.seed, epochs=args.epochs or Recipe.epochs, realdata=use_real)
            clf, summary = train_anatomy(
                args.out,
                recipe,
                realdata_root=root,
                exclude_sources=args.exclude_source,
                threads=_threads(settings),
                workers=args.workers,
                log=log,
            )
            if use_real and not args.exclude_source and not args.no_loso_rule:
                # thresholds chosen on predictions of models that never saw the source they predict
                clf, summary = set_loso_rule(
                    args.out,
                    clf,
                    summary,
                    recipe,
                    realdata_root=root,
                    threads=_threads(settings),
                    workers=args.workers,
                    log=log,
                )
            path = Path(args.out) / "model.pt"
            if motion_n > 0:
                path = train_motion_detector(
                    path,
                    motion_n,
                    motion_seed,
                    held=set(summary["held_groups"]),
                    realdata_root=root,
                    exclude_sources=args.exclude_source,
                    use_real=use_real,
                    threads=_threads(settings),
                    workers=args.workers,
                    log=log,
                )
        elif args.model == MODEL_LEVELS:
            from models.levels.cli import train_levels_cmd

            return train_levels_cmd(args, spec, threads=_threads(settings))
        elif args.model == "lumbar_spine.discs":
            from models.discs.training import DiscRecipe, train_discs

            if spec.kind != "spider":
                _err("lumbar_spine.discs trains on --data spider:PATH (a folder in the SPIDER mid-sagittal layout)")
                return EXIT_BAD_INPUT
            disc_recipe = DiscRecipe(
                data=str(spec),
                seed=args.seed,
                loc_epochs=args.epochs or DiscRecipe.loc_epochs,
                grade_epochs=args.epochs or DiscRecipe.grade_epochs,
                lr=args.lr or DiscRecipe.lr,
                threads=_threads(settings),
                augment=not args.no_augment,
            )
            path = train_discs(spec.required_path(), args.out, disc_recipe, log=log)
        elif args.model == MODEL_SUPERRES:
            rc = _train_superres(args, spec, settings, log)
            if rc:
                return rc
            path = Path(args.out) / "model.pt"
        else:
            from models.tasks import TASKS
            from models.training import Recipe as ClassifierRecipe
            from models.training import train

            init = args.init
            if init == "registry":
                found = _registry(settings).weights_path(args.model)
                if found is None:
                    _err(f"--init registry: the registry holds no weights for {args.model}")
                    return EXIT_BAD_INPUT
                init = str(found)
                print(f"fine-tuning from the registry's weights: {init}", flush=True)
            classifier_recipe = ClassifierRecipe(
                data=str(spec),
                seed=args.seed,
                epochs=args.epochs or 8,
                batch_size=args.batch_size,
                lr=args.lr if args.lr is not None else 2e-3,
                threads=_threads(settings),
                max_steps=args.max_steps,
                augment=not args.no_augment,
                init=str(init) if init else None,
                patch_steps=TASKS[args.model].patch_pretrain_steps if args.patch_steps is None else args.patch_steps,
                patch_lr=args.patch_lr,
            )
            from models.training import ProgressBar

            bar = None if getattr(args, "no_progress", False) else ProgressBar()
            path = train(
                TASKS[args.model],
                classifier_recipe,
                args.out,
                cache_root=args.cache,
                workers=args.workers,
                log=bar.write if bar is not None else log,
                progress=bar,
            )
    except (DataSpecError, TrainingError, VolumeError) as e:
        _err(str(e))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(file=sys.stderr)
        _err(
            f"interrupted; run the same command again to resume from the last finished epoch "
            f"({Path(args.out) / 'checkpoint.pt'})"
        )
        return EXIT_INTERRUPTED
    print(f"weights: {path}")
    return 0


def _train_superres(args, spec, settings, log) -> int:
    """``train superres``: phantoms (``synthetic:N:SEED``) + the real corpus (``--realdata PATH|auto|none``, or
    ``--data realdata:PATH``), fine-tuned from ``--init`` when given; one progress line per epoch; the model card
    written into ``--out``; ``--resume`` continues an interrupted run."""
    from models.errors import SuperResError
    from models.realdata import realdata_root
    from models.superres.data import TRAIN_SEED, resolve_families
    from models.superres.training import train_mix_to

    if spec.kind == "synthetic":
        n_phantoms, seed = spec.n, spec.seed
        where = args.realdata
        root = None if where == "none" else (realdata_root() if where == "auto" else Path(where))
        if where not in ("auto", "none") and (root is None or not root.is_dir()):
            _err(f"--realdata {where}: not a folder")
            return EXIT_BAD_INPUT
        if where == "auto" and root is None:
            print("real corpus not found (MSKNODE_REALDATA, ../shared/realdata): phantoms only", flush=True)
    elif spec.kind == "realdata":
        root = spec.required_path()
        if not root.is_dir():
            _err(f"{spec}: not a folder")
            return EXIT_BAD_INPUT
        n_phantoms, seed = (40 if args.phantoms is None else args.phantoms), TRAIN_SEED
    else:
        _err("superres trains on synthetic:N:SEED (phantoms; plus --realdata) or realdata:PATH (real MR + phantoms)")
        return EXIT_BAD_INPUT
    try:
        exclude = resolve_families(args.exclude_source)
    except SuperResError as e:
        _err(f"--exclude-source: {e}; families: knee, shoulder, lumbar, brain, other")
        return EXIT_BAD_INPUT
    init = args.init
    if init == "registry":
        found = _registry(settings).weights_path("superres")
        if found is None:
            _err("--init registry: the registry holds no weights for superres")
            return EXIT_BAD_INPUT
        init = found

    def progress(rec: dict[str, Any]) -> None:
        if "step" in rec and "l1" in rec:
            val = "  ".join(f"{k[4:]} {v:+.3f}" for k, v in rec.items() if k.startswith("val_"))
            log(
                f"epoch {rec['step'] // max(1, rec.get('epoch_steps', 50))}: step {rec['step']}  loss {rec['l1']:.5f} "
                f"(interpolated {rec['l1_interpolated']:.5f})  {val}  {rec['seconds']:.0f} s"
            )
        elif "real_volume" not in rec:
            log(json.dumps(rec))

    try:
        train_mix_to(
            args.out,
            realdata_root=root,
            n_phantoms=n_phantoms,
            seed=seed,
            exclude=exclude,
            epochs=args.epochs,
            steps=args.max_steps,
            init=Path(init) if init else None,
            lr=args.lr,
            threads=_threads(settings),
            resume=args.resume,
            log=progress,
        )
    except SuperResError as e:
        _err(str(e))
        return EXIT_BAD_INPUT
    return 0


# --- evaluate --------------------------------------------------------------------------------------


def cmd_evaluate(args, settings) -> int:
    import torch

    from models.errors import DataSpecError, RegistryError, VolumeError
    from models.evaluation import evaluate

    torch.set_num_threads(_threads(settings))
    registry = _registry(settings)
    progress = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    from models.registry import MODEL_LEVELS

    if args.model == MODEL_LEVELS:
        from models.levels.cli import evaluate_levels_cmd

        return evaluate_levels_cmd(args, registry, log=progress)
    try:
        result = evaluate(
            args.model,
            args.data,
            registry=registry,
            weights=args.weights,
            workers=args.workers,
            log=progress,
            bootstrap=args.bootstrap,
            loso=args.loso,
        )
        if args.compare:
            old_weights = None if args.compare == "registry" else Path(args.compare)
            old = evaluate(
                args.model,
                args.data,
                registry=registry,
                weights=old_weights,
                workers=args.workers,
                log=progress,
                bootstrap=args.bootstrap,
                loso=args.loso,
            )
            result = comparison(old, result, old_label=args.compare, new_label=str(args.weights or "registry"))
    except (DataSpecError, VolumeError) as e:
        _err(str(e))
        return EXIT_BAD_INPUT
    except RegistryError as e:
        _err(str(e))
        return EXIT_REFUSED
    print_evaluation(result, as_json=args.json)
    return 0


def print_evaluation(result: dict[str, Any], *, as_json: bool) -> None:
    """An evaluation on stdout: one JSON line, or its ``warnings`` (``WARNING: ...``) then the readable lines."""
    if as_json:
        print(json.dumps(result))
    else:
        for w in result.get("warnings", []):
            print(f"WARNING: {w}")
        print("\n".join(readable({k: v for k, v in result.items() if k != "warnings"})))


def comparison(old: dict[str, Any], new: dict[str, Any], *, old_label: str, new_label: str) -> dict[str, Any]:
    """Two evaluations on the same cases side by side: ``old``, ``new`` and ``difference`` (new - old) of every
    number both report at the top level; ``warnings`` of both."""
    diff: dict[str, float] = {}
    for k, v in new.items():
        o = old.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not isinstance(o, (int, float)):
            continue
        if math.isfinite(v) and math.isfinite(o):
            diff[k] = round(float(v) - float(o), 6)
    warnings = list(dict.fromkeys([*old.get("warnings", []), *new.get("warnings", [])]))
    return {
        "data": new.get("data"),
        "old": {"weights": old_label, **{k: v for k, v in old.items() if k != "warnings"}},
        "new": {"weights": new_label, **{k: v for k, v in new.items() if k != "warnings"}},
        "difference": diff,
        "warnings": warnings,
    }


# --- predict -------------------------------------------------------------------------------------------


def _anatomy_of(volume, registry) -> tuple[str | None, str]:
    from models.qc import header_anatomy

    anatomy = header_anatomy(volume.body_part)
    if anatomy:
        return anatomy, "header"
    from models.registry import MODEL_ANATOMY

    if registry.has_weights(MODEL_ANATOMY):
        pred = registry.get(MODEL_ANATOMY).predict(volume)
        if pred["label"] != "other":
            return pred["label"].split("/")[0], "pixels"
    return None, "unknown"


def _finding_json(f) -> dict[str, Any]:
    return {
        "code": f.code,
        "label": f.label,
        "probability": f.probability,
        "uncertainty": f.uncertainty,
        "positive": f.positive,
        "threshold": f.threshold,
        "grade": f.grade,
        "grade_probabilities": f.grade_probabilities,
        "level": f.level,
        "site": f.site,
        "location": list(f.location) if f.location else None,
        "location_mm": list(f.location_mm) if f.location_mm else None,
    }


def cmd_predict(args, settings) -> int:
    import torch

    from models.errors import RegistryError, VolumeError
    from models.io import load_folder
    from models.pipelines import PIPELINES
    from models.tasks import TASKS
    from models.types import NOT_FOR_DIAGNOSTIC_USE

    torch.set_num_threads(_threads(settings))
    registry = _registry(settings)
    if args.model is not None and args.model not in TASKS:
        _err(f"unknown model {args.model!r}; classifiers: {', '.join(sorted(TASKS))}")
        return EXIT_BAD_INPUT
    try:
        volumes = load_folder(args.dicom_dir)
    except VolumeError as e:
        _err(str(e))
        return EXIT_BAD_INPUT
    report: dict[str, Any] = {"folder": str(args.dicom_dir), "series": [], "notice": NOT_FOR_DIAGNOSTIC_USE}
    try:
        for uid, vol in sorted(volumes.items()):
            entry: dict[str, Any] = {
                "series_uid": uid,
                "description": vol.series_description,
                "shape": list(vol.shape),
                "models": [],
            }
            if args.model:
                names = [args.model]
                entry["anatomy"], entry["anatomy_source"] = TASKS[args.model].anatomy, "--model"
            else:
                anatomy, source = _anatomy_of(vol, registry)
                entry["anatomy"], entry["anatomy_source"] = anatomy, source
                names = list(PIPELINES[anatomy].models) if anatomy in PIPELINES else []
                if not names:
                    entry["note"] = (
                        "no shipped model for this anatomy"
                        if anatomy
                        else "anatomy unknown (no BodyPartExamined, pixels not recognised); use --model"
                    )
            for name in names:
                model = registry.get(name)
                out = model.predict(vol, saliency=not args.no_saliency)
                entry["models"].append(
                    {
                        "model": out.model.name,
                        "version": out.model.version,
                        "weights_sha256": out.model.weights_sha256,
                        "qc": {"accepted": out.qc.accepted, "reason": out.qc.reason, "message": out.qc.message},
                        "findings": [_finding_json(f) for f in out.findings],
                        "timings": {k: round(v, 3) for k, v in out.timings.items()},
                    }
                )
            report["series"].append(entry)
    except RegistryError as e:
        _err(str(e))
        return EXIT_REFUSED
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for s in report["series"]:
        print(
            f"series {s['series_uid']} ({s['description'] or '-'}), {s['shape'][0]} slices, anatomy "
            f"{s['anatomy'] or '?'} ({s['anatomy_source']})"
        )
        if s.get("note"):
            print(f"  {s['note']}")
        for m in s["models"]:
            qc = m["qc"]
            print(
                f"  {m['model']} {m['version']} (weights {m['weights_sha256'][:12]}): "
                + ("QC accepted" if qc["accepted"] else f"QC refused [{qc['reason']}] {qc['message']}")
            )
            for f in m["findings"]:
                prob = "" if f["probability"] is None else f" P={f['probability']:.3f} +/- {f['uncertainty'] or 0:.3f}"
                grades = ", ".join(f"{k} {v:.2f}" for k, v in (f["grade_probabilities"] or {}).items())
                print(f"    {f['label']}{prob} (threshold {f['threshold']}) [{grades}]")
    print(NOT_FOR_DIAGNOSTIC_USE)
    return 0
