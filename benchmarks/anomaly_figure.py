"""The README's heat-map figure: test parts, the overlays ``clipxfer anomaly score --heatmaps`` wrote, and
the true masks, one column per defect kind (the first image of each, plus one good part).

    clipxfer anomaly textures textures/
    clipxfer anomaly fit textures/brick/train/good --model lite --shots 16 --seed 1 --out brick.safetensors
    clipxfer anomaly score textures/brick/test --detector brick.safetensors --heatmaps maps/
    python benchmarks/anomaly_figure.py textures/brick maps/ docs/figures/anomaly_heatmaps.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

TILE = 160


def _tile(path: Path | None) -> Image.Image:
    if path is None or not path.is_file():
        return Image.new("RGB", (TILE, TILE), "black")  # good parts have no mask: an empty one
    return Image.open(path).convert("RGB").resize((TILE, TILE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("texture", type=Path, help="one texture of the set, e.g. textures/brick")
    parser.add_argument("heatmaps", type=Path, help="the --heatmaps folder of 'anomaly score'")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()

    test, masks = args.texture / "test", args.texture / "ground_truth"
    kinds = ["good"] + sorted(p.name for p in masks.iterdir() if p.is_dir())
    columns = []
    for kind in kinds:
        image = sorted((test / kind).iterdir())[0]
        mask = masks / kind / f"{image.stem}_mask.png"
        columns.append((image, args.heatmaps / kind / f"{image.stem}.png", mask if kind != "good" else None))
    figure = Image.new("RGB", (TILE * len(columns), TILE * 3), "white")
    for x, paths in enumerate(columns):
        for y, path in enumerate(paths):
            figure.paste(_tile(path), (x * TILE, y * TILE))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print(f"wrote {args.out}: columns {', '.join(kinds)}")


if __name__ == "__main__":
    main()
