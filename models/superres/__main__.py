"""``python -m models.superres train|evaluate``: the super-resolution recipe and its evaluation
(foreground PSNR/SSIM gain over tricubic on fresh phantoms, or on real MR never trained on)."""

from __future__ import annotations

from pathlib import Path

import torch

import models.superres as _package
from models.errors import SuperResError
from models.superres.data import TRAIN_SEED, parse_synthetic, real_mr_cases
from models.superres.inference import MODEL_NAME, WEIGHTS_PATH, SuperResModel
from models.superres.quality import evaluate_cases, evaluate_synthetic
from models.superres.training import TrainConfig, train_to


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m models.superres", description=_package.__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train on noise-free phantoms")
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--phantoms", type=int, default=150)
    tr.add_argument("--steps", type=int, default=TrainConfig.steps)
    tr.add_argument("--seed", type=int, default=TRAIN_SEED)
    tr.add_argument("--threads", type=int, default=1)
    tr.add_argument("--reformat-share", type=float, default=0.0)
    lo = sub.add_parser("loso", help="leave-one-source-out on real MR: fold weights vs current vs tricubic")
    lo.add_argument("--realdata", type=Path, required=True, help="the real corpus (models.realdata)")
    lo.add_argument("--realdir", type=Path, required=True, help="its realdir view (python -m models.realdir export)")
    lo.add_argument("--out", type=Path, required=True)
    lo.add_argument("--epochs", type=int, default=8)
    lo.add_argument("--phantoms", type=int, default=40)
    ev = sub.add_parser("evaluate", help="foreground PSNR/SSIM gain over tricubic")
    ev.add_argument("--weights", type=Path, default=WEIGHTS_PATH)
    ev.add_argument("--data", default="synthetic:200:9000000", help="synthetic:N:SEED, or 'real' for real MR")
    ev.add_argument("--anatomy", default="knee")
    ev.add_argument("--snr", type=float, default=None, help="input SNR for --data real (default: no added noise)")
    ev.add_argument("--inplane", action="store_true")
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "train":
            log = lambda rec: print(json.dumps(rec), file=sys.stderr, flush=True)  # noqa: E731
            recipe = train_to(
                args.out,
                n_phantoms=args.phantoms,
                seed=args.seed,
                steps=args.steps,
                threads=args.threads,
                reformat_share=args.reformat_share,
                log=log,
            )
            print(json.dumps({"weights": recipe["weights"], "sha256": recipe["sha256"]}))
            return 0
        if args.cmd == "loso":
            from models.superres.loso import run

            torch.set_num_threads(1)
            loso = run(args.realdata, args.realdir, args.out, epochs=args.epochs, n_phantoms=args.phantoms)
            print(json.dumps(loso["decision"]))
            return 0
        torch.set_num_threads(args.threads)
        model = SuperResModel.load(args.weights)
        if args.data == "real":
            result = evaluate_cases(model, real_mr_cases(args.snr), inplane=args.inplane, keep_cases=True)
        else:
            n, seed = parse_synthetic(args.data)
            result = evaluate_synthetic(model, n, seed, anatomy=args.anatomy, inplane=args.inplane)
        result.update({"model": MODEL_NAME, "weights_sha256": model.info.weights_sha256, "data": args.data})
        if args.json:
            print(json.dumps(result))
        else:
            for k, v in result.items():
                print(f"{k}: {v}")
        return 0
    except (SuperResError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
