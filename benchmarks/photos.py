"""A folder of natural photos of varied sizes, JPEG and PNG, made from photos that ship in installed
wheels (no downloads): for benchmarks and tests of image storage and views.

    .venv/bin/python -m benchmarks.photos --output DIR [--n 40] [--seed 0] [--min-side 300] [--max-side 1200]

Sources: scikit-learn's datasets/images/china.jpg and flower.jpg (640 × 427) and matplotlib's
mpl-data/sample_data/grace_hopper.jpg (512 × 600). matplotlib's Minduka_Present_Blue_Pack.png is
not used: it is a 128 × 128 clip-art icon (a gift box on transparency), not a photo. Each output is a
seeded random crop of one source (aspect ratio 1:1, 4:3, 3:4, 3:2, 2:3 or 16:9, 55–100% of the
largest crop of that shape), randomly mirrored, rescaled (bicubic) so its shorter side is drawn
from [min_side, max_side], and saved as DIR/<source>/<i>.jpg (quality 95, 4:2:0, as a camera
writes) or DIR/<source>/<i>.png (lossless; compress_level 1 to keep it fast — the PNG's size does
not matter, only its pixels), alternately. Sources are 427–600 px on their shorter side, so
outputs above that are upsampled and hold less fine detail than a camera photo of that size;
after the pipeline's downscale to 256 px the difference is small.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9)  # width / height


def sources() -> dict[str, str]:
    """{class name: path} of the photos shipped in the installed wheels."""
    import matplotlib
    import sklearn

    sk = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    mpl = os.path.join(matplotlib.get_data_path(), "sample_data")
    found = {"china": os.path.join(sk, "china.jpg"), "flower": os.path.join(sk, "flower.jpg"),
             "hopper": os.path.join(mpl, "grace_hopper.jpg")}
    missing = [p for p in found.values() if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"source photos not installed: {missing}")
    return found


def _photo(src, rng: np.random.Generator, min_side: int, max_side: int):
    from PIL import Image

    w, h = src.size
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    cw, ch = (w, w / aspect) if w / h < aspect else (h * aspect, h)  # the largest crop of that shape
    s = rng.uniform(0.55, 1.0)
    cw, ch = max(8, int(cw * s)), max(8, int(ch * s))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = src.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    short = int(rng.integers(min_side, max_side + 1))
    scale = short / min(cw, ch)
    return img.resize((max(short, round(cw * scale)), max(short, round(ch * scale))), Image.Resampling.BICUBIC)


def write_photos(dst: str, n: int = 40, seed: int = 0, min_side: int = 300, max_side: int = 1200) -> list[str]:
    """Write n photos as dst/<source>/<i>.(jpg|png), even i JPEG, odd i PNG; returns their paths."""
    from PIL import Image

    srcs = {k: Image.open(p).convert("RGB") for k, p in sources().items()}
    names = sorted(srcs)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        name = names[i % len(names)]
        img = _photo(srcs[name], rng, min_side, max_side)
        os.makedirs(os.path.join(dst, name), exist_ok=True)
        if i % 2 == 0:
            path = os.path.join(dst, name, f"{i:04d}.jpg")
            img.save(path, format="JPEG", quality=95)
        else:
            path = os.path.join(dst, name, f"{i:04d}.png")
            img.save(path, format="PNG", compress_level=1)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=int, default=300)
    p.add_argument("--max-side", type=int, default=1200)
    a = p.parse_args(argv)
    paths = write_photos(a.output, a.n, a.seed, a.min_side, a.max_side)
    total = sum(os.path.getsize(x) for x in paths)
    print(f"wrote {len(paths)} photos ({total / 1e6:.1f} MB) under {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
