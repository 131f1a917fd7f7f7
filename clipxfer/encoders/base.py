"""The encoder protocol every backend implements.

An encoder turns images and texts into L2-normalised float32 rows in one shared space, and
names itself with a stable ``id`` that every artifact (index, head, bench result) records.
Backends implement two methods, :meth:`Encoder.encode_pixels` and :meth:`Encoder.encode_texts`;
decoding, batching and normalisation of inputs live here once. Backends with dense features also
implement ``_forward_patches``, which :meth:`Encoder.encode_patches` exposes (anomaly detection).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ClipxferError
from ..images import ImageLike, load_model_input
from ..vector_math import l2_normalize


@dataclass(frozen=True)
class ImageEncoding:
    """What one image batch gives.

    ``embeddings``: ``(n, dim)`` L2-normalised rows in the shared image-text space.
    ``features``: ``(n, feature_dim)`` the representation few-shot probes train on; for CLIP
    models the same array as ``embeddings``, for ``lite`` the 1280-d backbone features.
    """

    embeddings: np.ndarray
    features: np.ndarray


@dataclass(frozen=True)
class PatchFeatures:
    """Dense features of one image batch, for locating things inside images.

    ``maps``: local features at several depths, finest first, each ``(n, h_i, w_i, c_i)`` float32
    (channels last; deeper maps may be coarser). ``joint``: ``(n, h, w, dim)`` L2-normalised patch
    embeddings in the shared image-text space, comparable with :meth:`Encoder.encode_texts` rows
    (open_clip ViTs: patch tokens through the final norm and projection, as in WinCLIP), or None
    when the encoder has no such projection (``lite``).
    """

    maps: list[np.ndarray]
    joint: np.ndarray | None


class Encoder(ABC):
    """Base class of all encoders; see the module docstring for the contract."""

    #: Stable identifier, e.g. ``open_clip:ViT-B-32:laion2b_s34b_b79k`` or ``lite:...``.
    id: str
    #: Width of the shared image-text embedding.
    dim: int
    #: Width of :attr:`ImageEncoding.features`.
    feature_dim: int
    #: Side of the square ``uint8`` input :meth:`encode_pixels` expects.
    input_size: int
    #: Per-channel mean and std applied to pixels scaled to [0, 1].
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    dtype: torch.dtype
    #: Exponentiated CLIP temperature: logits = logit_scale * image @ text.T
    logit_scale: float = 100.0
    #: Where the image tower runs (``torch`` or ``openvino``) and in which precision; set by
    #: :func:`~clipxfer.encoders.registry.load_encoder`.
    runtime: str = "torch"
    precision: str = "fp32"
    #: Whether ``--precision auto`` may pick int8 for this model: only where int8 passed the
    #: quality gate (cosine >= 0.99 to fp32, accuracy within 0.01; see benchmarks/RESULTS.md).
    int8_by_default: bool = True
    #: Set when another runtime runs the image tower: uint8 NHWC batch -> :meth:`image_graph`'s outputs.
    image_runtime: Callable[[np.ndarray], list[np.ndarray]] | None = None
    #: The same for the dense patch features: uint8 NHWC batch -> :meth:`patch_graph`'s outputs.
    patch_runtime: Callable[[np.ndarray], list[np.ndarray]] | None = None

    @abstractmethod
    def _forward_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised NCHW pixels on ``self.device`` in ``self.dtype`` -> (embeddings, features)."""

    def image_graph(self) -> torch.nn.Module:
        """The image tower as one module for export: normalised fp32 NCHW pixels -> a tensor or
        tuple of tensors that :meth:`_image_outputs` turns into (embeddings, features)."""
        raise ClipxferError(f"{self.id} cannot run its image tower outside torch")

    def _image_outputs(self, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`image_graph`'s outputs -> (embeddings, features or None); by default the one output."""
        return outputs[0], None

    def expect_images(self, paths: Sequence) -> None:
        """A hint that these image files are about to be encoded: a runtime that still has to
        calibrate (OpenVINO int8) calibrates on some of them instead of on stock photos."""
        if self.image_runtime is not None and hasattr(self.image_runtime, "expect_images"):
            self.image_runtime.expect_images(paths)

    @abstractmethod
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> ``(n, dim)`` L2-normalised float32 embeddings."""

    def pixels_to_tensor(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``uint8 (n, H, W, 3)`` -> normalised channels-last NCHW tensor on the model's device.

        The uint8 batch crosses to the device first, so a GPU receives a quarter of the bytes
        and does the scaling itself.
        """
        batch = torch.as_tensor(pixels)
        if batch.device != self.device:
            batch = batch.to(self.device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).to(torch.float32)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255.0
        batch = (batch - mean) / std
        return batch.to(self.dtype).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def encode_pixels(self, pixels: np.ndarray | torch.Tensor) -> ImageEncoding:
        """Encode a ``uint8 (n, input_size, input_size, 3)`` batch."""
        if len(pixels) == 0:
            empty = np.zeros((0, self.dim), np.float32)
            return ImageEncoding(empty, np.zeros((0, self.feature_dim), np.float32))
        if self.image_runtime is not None:
            batch = pixels.cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
            outputs = tuple(torch.from_numpy(output) for output in self.image_runtime(batch))
            embeddings, features = self._image_outputs(outputs)
        else:
            embeddings, features = self._forward_images(self.pixels_to_tensor(pixels))
        embeddings = l2_normalize(embeddings.float().cpu().numpy())
        if features is None:
            return ImageEncoding(embeddings, embeddings)
        return ImageEncoding(embeddings, features.float().cpu().numpy())

    def _forward_patches(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Normalised NCHW pixels -> (NCHW feature maps finest first, NCHW joint-space patch
        embeddings or None). Backends without dense features keep this default."""
        from ..errors import ClipxferError

        raise ClipxferError(f"model {self.id} has no dense patch features: use --model lite or an open_clip ViT")

    def patch_graph(self) -> torch.nn.Module:
        """:meth:`_forward_patches` as one module for export: normalised fp32 NCHW pixels -> the
        feature maps, then the joint-space patch embeddings when the model has them. Raises
        :class:`ClipxferError` (from a one-image trial run) for models without dense features."""
        graph = _PatchGraph(self)
        with torch.inference_mode():
            _, joint = self._forward_patches(torch.zeros(1, 3, self.input_size, self.input_size, dtype=self.dtype,
                                                         device=self.device))
        graph.has_joint = joint is not None
        return graph

    @torch.inference_mode()
    def encode_patches(self, pixels: np.ndarray | torch.Tensor) -> PatchFeatures:
        """Dense patch features of a ``uint8 (n, input_size, input_size, 3)`` batch; see :class:`PatchFeatures`."""
        if self.patch_runtime is not None:
            batch = pixels.cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
            outputs = [torch.from_numpy(output) for output in self.patch_runtime(batch)]
            maps, joint = (outputs[:-1], outputs[-1]) if self.patch_runtime.has_joint else (outputs, None)
        else:
            maps, joint = self._forward_patches(self.pixels_to_tensor(pixels))
        as_rows = [m.float().permute(0, 2, 3, 1).contiguous().cpu().numpy() for m in maps]
        if joint is not None:
            joint = torch.nn.functional.normalize(joint.float().permute(0, 2, 3, 1), dim=-1).contiguous().cpu().numpy()
        return PatchFeatures(as_rows, joint)

    def embed_images(
        self,
        images: Sequence[ImageLike],
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> ImageEncoding:
        """Decode and encode images (paths, PIL images or uint8 arrays), ``batch_size`` at a time.

        Unreadable images raise :class:`~clipxfer.errors.ImageDecodeError`; the indexer uses
        its own pipeline that skips them instead. ``progress(n)`` is called after each batch.
        """
        embedding_parts, feature_parts = [], []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = np.stack([load_model_input(item, self.input_size) for item in chunk])
            encoded = self.encode_pixels(pixels)
            embedding_parts.append(encoded.embeddings)
            feature_parts.append(encoded.features)
            if progress:
                progress(len(chunk))
        if not embedding_parts:
            return self.encode_pixels(np.zeros((0, self.input_size, self.input_size, 3), np.uint8))
        embeddings = np.concatenate(embedding_parts)
        same = all(e is f for e, f in zip(embedding_parts, feature_parts))
        return ImageEncoding(embeddings, embeddings if same else np.concatenate(feature_parts))

    def encode_images(self, images: Sequence[ImageLike], batch_size: int = 64) -> np.ndarray:
        """Images -> ``(n, dim)`` L2-normalised float32 embeddings in the shared space."""
        return self.embed_images(images, batch_size).embeddings

    def __repr__(self) -> str:
        precision = self.precision if self.runtime != "torch" else str(self.dtype).removeprefix("torch.")
        return f"<{type(self).__name__} {self.id} on {self.device} ({self.runtime} {precision})>"


class _PatchGraph(torch.nn.Module):
    """An encoder's :meth:`Encoder._forward_patches` as a module a runtime can convert: the maps,
    then the joint-space patch embeddings if there are any (``has_joint``)."""

    has_joint: bool = False

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        # Registered so that .float()/.eval() and tracing reach the weights.
        self.tower = encoder.image_graph()

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps, joint = self.encoder._forward_patches(pixels)
        return (*maps, joint) if joint is not None else tuple(maps)
