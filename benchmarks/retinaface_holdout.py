"""recipes/retinaface_half.yaml measured on real group photos it never saw.

The recipe finetunes on every photo of ``real_photos/group``; a number measured
on those photos would be measured on the training data.  This script splits the
photos (sorted by name) into ``--folds`` folds, photo ``i`` in fold ``i mod
folds``, and for each fold runs the recipe with ``data.images`` pointing at the
other folds' photos, then measures the agreement AP of the compressed model with
the original RetinaFace on the fold's own photos, before finetuning (the
structural pass alone) and after.  Each photo is thus held out exactly once.
The original against itself is measured too (1.0 by construction, a sanity
check of the protocol).

    python benchmarks/retinaface_holdout.py     # writes benchmarks/results/retinaface_holdout.json

Every step is a `compress` command, printed as it runs, so each number can be
reproduced by hand.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "reference"


def compress(*args: str) -> str:
    command = [sys.executable, "-m", "compressor", *args]
    print("$ compress " + " ".join(shlex.quote(a) for a in args), flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def agreement(model: Path, images: Path, teacher: Path) -> dict:
    return json.loads(compress("eval", str(model), "--images", str(images), "--against", str(teacher), "--json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "retinaface_half.yaml")
    parser.add_argument("--photos", type=Path, default=SHARED / "real_photos" / "group")
    parser.add_argument("--teacher", type=Path, default=SHARED / "retinaface_mnet025_widerface.pth")
    parser.add_argument("--folds", type=int, default=3, help="photo i (sorted by name) is held out in fold i mod N")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "retinaface_holdout")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "retinaface_holdout.json")
    args = parser.parse_args()

    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    folds = [run_fold(args, photos, fold) for fold in range(args.folds)]
    result = {
        "recipe": str(args.recipe.relative_to(ROOT)) if args.recipe.is_relative_to(ROOT) else str(args.recipe),
        "folds": folds,
        "mean_after_finetuning": sum(f["after_finetuning"]["ap"] for f in folds) / len(folds),
        "min_after_finetuning": min(f["after_finetuning"]["ap"] for f in folds),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def run_fold(args: argparse.Namespace, photos: list[Path], fold: int) -> dict:
    held = photos[fold:: args.folds]
    train = [p for p in photos if p not in held]
    work = args.work / f"fold{fold}"
    for name, members in {"train": train, "held_out": held}.items():
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            stale.unlink()
        for photo in members:
            (folder / photo.name).symlink_to(photo.resolve())
    held_dir, override = work / "held_out", f"data.images={(work / 'train').resolve()}"
    for stale_run in (work / "run", work / "run_no_finetune"):
        shutil.rmtree(stale_run, ignore_errors=True)  # this script's own folders: measure afresh

    started = time.monotonic()
    compress("run", str(args.recipe), "--out", str(work / "run"), "--set", override, "--quiet")
    seconds = time.monotonic() - started
    compress("run", str(args.recipe), "--out", str(work / "run_no_finetune"), "--set", override,
             "--no-finetune", "--quiet")
    return {
        "train_photos": [p.name for p in train],
        "held_out_photos": [p.name for p in held],
        "run_seconds": round(seconds, 1),
        "teacher_against_itself": agreement(args.teacher, held_dir, args.teacher),
        "before_finetuning": agreement(work / "run_no_finetune", held_dir, args.teacher),
        "after_finetuning": agreement(work / "run", held_dir, args.teacher),
    }


if __name__ == "__main__":
    main()
