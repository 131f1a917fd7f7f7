"""The single-machine scheduler: units one after another, decoding in worker processes
(:func:`clipxfer.encoders.pipeline.decoded_items`, as ``clipxfer index`` does) while batches encode here."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ..encoders.pipeline import Failure, ItemInfo, decoded_items, encode_decoded
from ..progress import progress_bar
from .shards import ShardData
from .sources import Unit, decode_item, read_unit, unit_size


class ShardBuilder:
    """Collects one unit's encoded rows and failures into a :class:`ShardData` (both engines)."""

    def __init__(self, name: str):
        self.name = name
        self.infos: list[ItemInfo] = []
        self.embeddings: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.failed: list[Failure] = []
        self.same_features = True

    def add(self, infos: Sequence[ItemInfo], embeddings: np.ndarray, features: np.ndarray) -> None:
        self.infos.extend(infos)
        self.embeddings.append(embeddings)
        self.features.append(features)
        self.same_features = self.same_features and features is embeddings

    def build(self, dim: int, feature_dim: int) -> ShardData:
        embeddings = np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, dim), np.float32)
        features = None
        if not self.same_features:
            features = np.concatenate(self.features) if self.features else np.zeros((0, feature_dim), np.float32)
        return ShardData(
            self.name,
            [i.key for i in self.infos],
            [i.sha256 for i in self.infos],
            [i.width for i in self.infos],
            [i.height for i in self.infos],
            [i.size for i in self.infos],
            embeddings,
            features,
            sorted(self.failed, key=lambda f: str(f.path)),
        )


def run_local(
    units: Sequence[Unit], encoder, batch_size: int, workers: int | None = None, progress: bool = False
) -> Iterator[ShardData]:
    """Encode ``units`` in order with ``encoder`` in this process; one :class:`ShardData` each.
    ``progress``: a bar of items (embedded or failed) on a terminal's stderr."""
    sizes = [unit_size(unit) for unit in units]
    # Folders and HF datasets know their item counts up front; tar and parquet units are counted
    # as they are read, so the ETA firms up as the job goes.
    with progress_bar(sum(n or 0 for n in sizes) or None, "embedding", "img", progress) as bar:
        for unit, size in zip(units, sizes):
            builder = ShardBuilder(unit.name)
            items = []
            for item in read_unit(unit):
                (builder.failed if isinstance(item, Failure) else items).append(item)
            if size is None:
                bar.total = (bar.total or 0) + len(items) + len(builder.failed)
                bar.refresh()
            bar.update(len(builder.failed))
            decoded = decoded_items(items, decode_item, encoder.input_size, workers, prefetch=2 * batch_size)
            for result in encode_decoded(encoder, decoded, batch_size):
                if isinstance(result, Failure):
                    builder.failed.append(result)
                    bar.update(1)
                    continue
                infos, encoding = result
                builder.add(infos, encoding.embeddings, encoding.features)
                bar.update(len(infos))
            yield builder.build(encoder.dim, encoder.feature_dim)
