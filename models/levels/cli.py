"""``msknode train lumbar_spine.levels`` and ``msknode evaluate lumbar_spine.levels`` (called by `models.cli`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3
EXIT_INTERRUPTED = 130
SEGMENTED = Path("lumbar_spine") / "segmented_volumes"


def spine_root(spec) -> Path:
    """The spinevol folder of a data spec: ``spinevol:PATH`` itself, ``realdata:PATH`` its segmented volumes."""
    from models.errors import DataSpecError

    if spec.kind == "spinevol":
        root = spec.required_path()
    elif spec.kind == "realdata":
        from models.realdata import realdata_root

        base = realdata_root() if str(spec.path) == "auto" else spec.required_path()
        if base is None:
            raise DataSpecError("realdata:auto: the real corpus was not found (MSKNODE_REALDATA, ../shared/realdata)")
        root = Path(base) / SEGMENTED
    else:
        raise DataSpecError(
            f"lumbar_spine.levels reads --data spinevol:PATH (a folder of segmented .npz volumes with volumes.csv) "
            f"or realdata:PATH, not {spec.kind}"
        )
    if not root.is_dir():
        raise DataSpecError(f"{root}: not a folder")
    return root


def _err(msg: str) -> None:
    print(f"msknode: {msg}", file=sys.stderr)


def train_levels_cmd(args, spec, *, threads: int) -> int:
    from models.errors import DataSpecError, TrainingError
    from models.levels.training import Recipe, stderr_progress, train_levels

    try:
        root = spine_root(spec)
        recipe = Recipe(
            data=f"spinevol:{root}",
            epochs=args.epochs or Recipe.epochs,
            steps_per_epoch=getattr(args, "steps_per_epoch", None) or Recipe.steps_per_epoch,
            batch_size=Recipe.batch_size if args.batch_size == 16 else int(args.batch_size),
            lr=Recipe.lr if args.lr in (None, 2e-3) else float(args.lr),
            seed=int(args.seed),
            max_steps=args.max_steps,
            augment=not args.no_augment,
            threads=threads,
        )
        registry_stenosis = None
        try:
            from models.registry import Registry

            reg = Registry()
            if reg.has_weights("lumbar_spine.stenosis"):
                registry_stenosis = reg.get("lumbar_spine.stenosis")
        except Exception:  # the comparison is optional in the card
            registry_stenosis = None
        path = train_levels(
            root,
            Path(args.out),
            recipe,
            log=lambda m: print(m, flush=True),
            progress=stderr_progress if sys.stderr.isatty() else None,
            card_phantoms=3,
            card_stenosis=registry_stenosis,
        )
    except (DataSpecError, TrainingError) as e:
        _err(str(e))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _err(f"interrupted; run the same command again to resume from {Path(args.out) / 'checkpoint.pt'}")
        return EXIT_INTERRUPTED
    print(f"weights: {path}")
    return 0


def evaluate_levels_cmd(args, registry, *, log) -> int:
    from models.data import parse_spec
    from models.errors import DataSpecError, RegistryError
    from models.levels.evaluation import evaluate_phantoms, evaluate_real

    try:
        spec = parse_spec(args.data)
        if args.weights is not None:
            from models.protocol import load

            model = load(Path(args.weights), gate=registry.gate())
        else:
            model = registry.get("lumbar_spine.levels")
        result: dict[str, Any]
        if spec.kind == "synthetic":
            result = evaluate_phantoms(model, spec.n, spec.seed, log=log)
        else:
            root = spine_root(spec)
            result = {
                "data": f"spinevol:{root}",
                "split": "held-out test patients",
                **evaluate_real(model, root, log=log),
            }
        result = {"model": "lumbar_spine.levels", "weights_sha256": model.info.weights_sha256, **result}
    except DataSpecError as e:
        _err(str(e))
        return EXIT_BAD_INPUT
    except RegistryError as e:
        _err(str(e))
        return EXIT_REFUSED
    from models.cli import print_evaluation

    print_evaluation(result, as_json=args.json)
    return 0
