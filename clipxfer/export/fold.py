"""Heads and detectors folded into the image tower: one torch module per bundle, pixels in, the
answer out, which OpenVINO converts into a single graph.

Every head clipxfer saves is a function of the encoder's two outputs (shared-space embeddings and
probe features) made of matrix products, norms, ``exp`` and ``relu``, so each is rebuilt here in
torch behind the tower: linear heads (probe, mix, lpp, clap, finetune), zero-shot and CoOp text
weights, Tip-Adapter's cache (two matmuls and an ``exp``), transductive prototypes, meta heads and
heads on meta-adapted features. Only TransCLIP cannot be folded: it solves over the whole batch it
is given, so its answer for one image depends on the others (export its base head instead).

A detector's graph takes the part at the working resolution it was fitted at (cut into the toolkit's
overlapping tiles and stitched back above the encoder's input) and runs the dense patch features,
PatchCore's neighbourhood aggregation, the nearest-neighbour distance to the memory bank (held in the
graph as a constant), the Gaussian detector's pooled statistics and Mahalanobis distance, the WinCLIP
text states, the upsampling, the Gaussian smoothing and a fused detector's calibrated maximum over its
members, and gives the map and the image score.

Each function mirrors the numpy one the toolkit runs (named in its docstring); tests compare them.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.base import Encoder
from ..errors import ClipxferError
from ..heads.base import Head

#: The methods whose logits are linear parts (:mod:`clipxfer.heads.linear`).
LINEAR_METHODS = ("probe", "mix", "lpp", "clap", "finetune")
#: What each method becomes in the graph (for the manifest and the docs).
FOLDING = {
    **{method: "linear parts folded into the graph" for method in LINEAR_METHODS},
    "zeroshot": "text class weights folded into the graph",
    "coop": "learned-prompt class weights folded into the graph",
    "tip": "zero-shot weights and the key-value cache (matmul, exp, matmul) folded into the graph",
    "transductive": "text weights, centre and prototypes folded into the graph",
    "meta": "feature adapter and prototypes folded into the graph",
    "adapted": "feature adapter and the inner head folded into the graph",
}

Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _normalize(rows: torch.Tensor) -> torch.Tensor:
    """:func:`clipxfer.encoders.base.l2_normalize` in torch (rows / max(norm, 1e-12))."""
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _adapt(weights: dict[str, np.ndarray], features: torch.Tensor) -> torch.Tensor:
    """:func:`clipxfer.heads.metalearned.apply_adapter` in torch."""
    x = _normalize(features)
    hidden = torch.relu(x @ _tensor(weights["adapter.w1"]).T + _tensor(weights["adapter.b1"]))
    return x + hidden @ _tensor(weights["adapter.w2"]).T


def head_logits(head: Head) -> Logits:
    """``(embeddings, features) -> logits`` for ``head`` in torch, embeddings already L2-normalised
    (as :class:`~clipxfer.encoders.ImageEncoding` holds them); one line for a method that cannot fold."""
    method, weights, config = head.method, head.weights, head.config
    if method in LINEAR_METHODS:
        parts = {name: _tensor(weights[name]) for name in ("embedding_weights", "feature_weights", "bias")
                 if name in weights}  # fmt: skip

        def linear(embeddings, features):
            out = 0.0
            if "embedding_weights" in parts:
                out = out + embeddings @ parts["embedding_weights"].T
            if "feature_weights" in parts:
                out = out + _normalize(features) @ parts["feature_weights"].T
            if "bias" in parts:
                out = out + parts["bias"]
            return out

        return linear
    if method in ("zeroshot", "coop"):
        text, scale = _tensor(weights["class_weights"]), float(config["logit_scale"])
        return lambda embeddings, features: scale * embeddings @ text.T
    if method == "tip":
        text, scale = _tensor(weights["class_weights"]), float(config["logit_scale"])
        keys, values = _tensor(weights["keys"]), _tensor(weights["values"])
        alpha, beta, space = float(config["alpha"]), float(config["beta"]), config["key_space"]

        def tip(embeddings, features):
            queries = _normalize(features if space == "features" else embeddings)
            cache = torch.exp(-beta * (1.0 - queries @ keys.T)) @ values
            return scale * embeddings @ text.T + alpha * cache

        return tip
    if method == "transductive":
        text, scale = _tensor(weights["class_weights"]), float(config["logit_scale"])
        centre, prototypes = _tensor(weights["centre"]), _tensor(weights["prototypes"])
        prior = float(config["prior_weight"]) / float(config["zs_spread"])
        kappa = float(config["kappa"])
        return lambda embeddings, features: (
            prior * scale * embeddings @ text.T + kappa * _normalize(features - centre) @ prototypes.T
        )
    if method == "meta":
        prototypes, scale = _tensor(weights["prototypes"]), float(config["scale"])
        return lambda embeddings, features: scale * _normalize(_adapt(weights, features)) @ prototypes.T
    if method == "adapted":
        inner = head_logits(head.inner)
        return lambda embeddings, features: inner(embeddings, _adapt(weights, features))
    if method == "transclip":
        raise ClipxferError(
            "a transclip head cannot be exported: TransCLIP classifies a batch jointly, so one image's answer "
            "depends on the others; export the head it wraps (fit without --transductive)"
        )
    raise ClipxferError(f"a {method} head cannot be exported yet (exportable: {', '.join(sorted(FOLDING))})")


class HeadGraph(torch.nn.Module):
    """The image tower's raw outputs -> class logits: the encoding step (:meth:`Encoder._image_outputs`,
    L2 normalisation) and the head. An int8 bundle runs it as a second, float graph behind the
    quantized tower, as the toolkit's int8 runtime does."""

    def __init__(self, encoder: Encoder, head: Head):
        super().__init__()
        self.encoder = encoder
        self.logits = head_logits(head)

    def forward(self, *outputs: torch.Tensor) -> torch.Tensor:
        embeddings, features = self.encoder._image_outputs(tuple(outputs))
        embeddings = _normalize(embeddings.float())
        features = embeddings if features is None else features.float()
        return self.logits(embeddings, features)


def tower_outputs(tower: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    outputs = tower(pixels)
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


class ClassifierGraph(torch.nn.Module):
    """Normalised NCHW pixels -> class logits: the image tower and :class:`HeadGraph` in one graph."""

    def __init__(self, encoder: Encoder, head: Head):
        super().__init__()
        self.tower = encoder.image_graph()
        self.head = HeadGraph(encoder, head)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(*tower_outputs(self.tower, pixels))


# --------------------------------------------------------------------------- detectors


def aggregate(maps: list[torch.Tensor], neighbourhood: int) -> torch.Tensor:
    """:func:`clipxfer.anomaly.patches.aggregate` on NCHW maps: ``(n, sum c, h, w)``."""
    finest = maps[0].shape[2:]
    parts = []
    for feature_map in maps:
        x = F.avg_pool2d(feature_map.float(), neighbourhood, stride=1, padding=neighbourhood // 2,
                         count_include_pad=True)  # fmt: skip
        if tuple(x.shape[2:]) != tuple(finest):
            x = F.interpolate(x, size=tuple(finest), mode="bilinear", align_corners=False)
        parts.append(x)
    return torch.cat(parts, dim=1)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = int(math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def upsample_and_smooth(grid: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """:func:`clipxfer.anomaly.detector.upsample_and_smooth` in torch: ``(n, h, w)`` -> ``(n, size, size)``."""
    x = F.interpolate(grid.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    kernel = gaussian_kernel(sigma)
    pad = len(kernel) // 2
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def fusion_affine(entry: dict) -> tuple[float, float]:
    """``(threshold, scale)`` of one fused member, as :func:`clipxfer.anomaly.fusion.fuse` derives them
    from its calibration entry: the member's fused score is ``(score - threshold) / scale``."""
    threshold, median = entry.get("threshold"), entry.get("median")
    if threshold is not None:
        return float(threshold), max(threshold - median, 1e-12 * max(abs(threshold), 1.0))
    if median is not None:
        return float(median), max(entry.get("spread") or 0.0, 1e-12 * max(abs(median), 1.0))
    return 0.0, 1.0


def gaussian_factor(precision: np.ndarray) -> np.ndarray:
    """``L`` with ``L @ L.T == precision`` (Cholesky, in float64), so the Mahalanobis distance is
    ``|| centred @ L ||``: a sum of squares, which float32 keeps to its precision where the quadratic
    form ``centred @ P @ centred`` would cancel."""
    return np.linalg.cholesky(np.asarray(precision, np.float64))


class DetectorGraph(torch.nn.Module):
    """Normalised NCHW pixels (the whole part squashed to the detector's working resolution) ->
    (image scores ``(n,)``, anomaly maps ``(n, size, size)``): :meth:`clipxfer.anomaly.AnomalyDetector.score`
    after decoding, for every method (patchcore, gaussian, zeroshot, combined, fused with its
    Bonferroni-calibrated member scores). Above the encoder's input the part is cut into the same
    overlapping tiles as :func:`clipxfer.anomaly.tiling.encode_tiled`, encoded as one batch and stitched."""

    def __init__(self, encoder: Encoder, detector, neighbourhood: int, strides: tuple[int, int] | None = None):
        super().__init__()
        from ..anomaly.tiling import _centre_weights, tile_starts

        self.encoder = encoder
        self.tower = encoder.image_graph()  # registered so .float()/.eval() reach the weights
        self.config = dict(detector.config)
        self.neighbourhood = neighbourhood
        self.method = detector.method
        self.members = list(detector.members)
        self.size, self.tile = int(detector.map_size), int(encoder.input_size)
        self.sigma = float(self.config.get("smoothing_sigma", 4.0))
        self.starts, self.cells = [0], strides
        if self.size > self.tile:
            self.starts = tile_starts(self.size, self.tile, math.lcm(*strides))
            for name, cell in zip(("local_weight", "joint_weight"), strides):
                grid, g = self.size // cell, self.tile // cell
                weights = _centre_weights(g)
                total = np.zeros((grid, grid), np.float32)
                for top in self.starts:
                    for left in self.starts:
                        total[top // cell : top // cell + g, left // cell : left // cell + g] += weights
                self.register_buffer(name, _tensor(total))
            self.register_buffer("tile_weight", _tensor(_centre_weights(self.tile // strides[0])))
            self.register_buffer("joint_tile_weight", _tensor(_centre_weights(self.tile // strides[1])))
        if "memory_bank" in detector.arrays:
            bank = _tensor(detector.arrays["memory_bank"])
            self.register_buffer("bank", bank)
            self.register_buffer("bank_norms", (bank * bank).sum(dim=1))
        if "text_states" in detector.arrays:
            self.register_buffer("states", _tensor(detector.arrays["text_states"]))
        if "gaussian_mean" in detector.arrays:
            self.register_buffer("gaussian_mean", _tensor(detector.arrays["gaussian_mean"]))
            self.register_buffer("gaussian_factor", _tensor(gaussian_factor(detector.arrays["gaussian_precision"])))
        self.affine = {member: fusion_affine(entry) for member, entry in self.config.get("member_calibration", {}).items()}

    # ------------------------------------------------------------------ dense features

    def _stitch(self, tiles: torch.Tensor, cell: int, tile_weight: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """:func:`clipxfer.anomaly.tiling.stitch` on NCHW tiles batched tile-major."""
        count, grid = len(self.starts), self.size // cell
        g = tiles.shape[-1]
        tiles = tiles.reshape(count * count, -1, tiles.shape[1], g, g)
        out = 0.0
        for i, top in enumerate(self.starts):
            for j, left in enumerate(self.starts):
                y, x = top // cell, left // cell
                out = out + F.pad(tiles[i * count + j] * tile_weight, (x, grid - x - g, y, grid - y - g))
        return out / total

    def dense(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels -> (aggregated local features NCHW, normalised joint-space patches NCHW or None):
        :func:`clipxfer.anomaly.patches.encode_at_resolution`."""
        if self.size == self.tile:
            maps, joint = self.encoder._forward_patches(pixels)
            local = aggregate(maps, self.neighbourhood)
            return local, (F.normalize(joint.float(), dim=1) if joint is not None else None)
        s = self.tile
        crops = torch.cat([pixels[:, :, top : top + s, left : left + s] for top in self.starts for left in self.starts])
        maps, joint = self.encoder._forward_patches(crops)
        local = self._stitch(aggregate(maps, self.neighbourhood), self.cells[0], self.tile_weight, self.local_weight)
        if joint is not None:
            joint = self._stitch(F.normalize(joint.float(), dim=1), self.cells[1], self.joint_tile_weight,
                                 self.joint_weight)  # fmt: skip
            joint = F.normalize(joint, dim=1)
        return local, joint

    # ------------------------------------------------------------------ members

    def _patchcore_grid(self, local: torch.Tensor) -> torch.Tensor:
        n, c, h, w = local.shape
        rows = local.permute(0, 2, 3, 1).reshape(-1, c)
        squared = (rows * rows).sum(dim=1, keepdim=True) - 2.0 * rows @ self.bank.T + self.bank_norms
        return squared.min(dim=1).values.clamp_min(0.0).sqrt().reshape(n, h, w)

    def _zeroshot_grid(self, joint: torch.Tensor) -> torch.Tensor:
        joint = F.normalize(joint.float().permute(0, 2, 3, 1), dim=-1)
        logits = self.config["logit_scale"] * joint @ self.states.T
        return torch.softmax(logits, dim=-1)[..., 1]

    def _gaussian_scores(self, local: torch.Tensor) -> torch.Tensor:
        """:func:`clipxfer.anomaly.gaussian.gaussian_scores`: Mahalanobis distance of the pooled mean and
        (population) standard deviation over positions."""
        mean = local.mean(dim=(2, 3))
        std = ((local - mean[:, :, None, None]) ** 2).mean(dim=(2, 3)).sqrt()
        centred = torch.cat([mean, std], dim=1) - self.gaussian_mean
        return (centred @ self.gaussian_factor).norm(dim=1)

    def _member(self, member: str, local: torch.Tensor, joint: torch.Tensor | None):
        """(image scores, maps or None) of one member: :func:`clipxfer.anomaly.fusion.member_outputs`."""
        if member == "gaussian":
            return self._gaussian_scores(local), None
        grid = self._patchcore_grid(local) if member == "patchcore" else self._zeroshot_grid(joint)
        maps = upsample_and_smooth(grid, self.size, self.sigma)
        return maps.flatten(1).max(dim=1).values, maps

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local, joint = self.dense(pixels)
        if self.method == "combined":
            patchcore = self._member("patchcore", local, joint)[1]
            zeroshot = self._member("zeroshot", local, joint)[1]
            out = 0.5 * (patchcore / self.config["patchcore_scale"] + zeroshot / self.config["zeroshot_scale"])
            return out.flatten(1).max(dim=1).values, out
        if self.method != "fused":
            scores, maps = self._member(self.method, local, joint)
        else:
            # :func:`clipxfer.anomaly.fusion.fuse`: each member past its own threshold in units of its spread.
            parts, map_parts = [], []
            for member in self.members:
                member_scores, member_maps = self._member(member, local, joint)
                threshold, scale = self.affine[member]
                parts.append((member_scores - threshold) / scale)
                if member_maps is not None:
                    map_parts.append((member_maps - threshold) / scale)
            scores = torch.stack(parts).max(dim=0).values
            maps = torch.stack(map_parts).max(dim=0).values if map_parts else None
        if maps is None:  # only global statistics: the score everywhere, as the toolkit draws it
            maps = scores[:, None, None].expand(-1, self.size, self.size)
        return scores, maps
