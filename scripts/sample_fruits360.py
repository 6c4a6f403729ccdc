"""Make the bundled demo sample from ../shared/data/fruits360 (CC BY-SA 4.0).

Usage: python scripts/sample_fruits360.py SRC DEST [--train 30] [--test 10] [--seed 0]
Copies a seeded random sample per class into DEST/train/<class>/ and DEST/test/<class>/.
"""

import argparse
import random
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--train", type=int, default=30)
    ap.add_argument("--test", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    for cls_dir in sorted(p for p in Path(args.src).iterdir() if p.is_dir()):
        files = sorted(cls_dir.glob("*.jpg"))
        picked = rng.sample(files, args.train + args.test)
        for split, chosen in (("train", picked[: args.train]), ("test", picked[args.train:])):
            out = Path(args.dest) / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copyfile(f, out / f.name)


if __name__ == "__main__":
    main()
