"""Fine-tuned encoder + another head: fine-tune the image tower (``clipxfer finetune``), encode the
shots with the adapted encoder, then fit LP++, CLAP or the probe on those features, or wrap the
fine-tuned head in TransCLIP (``finetune+trans``). The result carries the adapted encoder as
``head.encoder``, like a fine-tuned head, so callers encode the images to classify with it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from ..heads.base import FewShotData, Head
from ..heads.fitting import fit_head
from ..heads.zeroshot import fit_zeroshot
from ..images import ImageLike

#: What may follow fine-tuning: a head refitted on the adapted features, or TransCLIP.
FOLLOWERS = ("probe", "lpp", "clap", "trans")


def fit_finetune_then(
    data: FewShotData,
    images: tuple[Sequence[ImageLike], Sequence[ImageLike]],
    then: str,
    **settings: Any,
) -> Head:
    """Fine-tune on ``data`` and ``images`` (``settings``: fine-tuning settings), then ``then``
    (one of :data:`FOLLOWERS`) on the adapted encoder's features of the same shots."""
    from ..finetune import fit_finetune_head

    if then not in FOLLOWERS:
        raise ValueError(f"then must be one of {', '.join(FOLLOWERS)}, not {then!r}")
    tuned = fit_finetune_head(data, images, **settings)
    encoder = tuned.encoder
    adapted = replace(
        data, encoder=encoder, train=encoder.embed_images(list(images[0])), val=encoder.embed_images(list(images[1])),
        zeroshot=fit_zeroshot(encoder, data.classnames, data.zeroshot.config.get("templates") or ["{}"]),
    )
    if then == "trans":
        from ..heads.transclip import TransCLIPHead

        head = TransCLIPHead.wrap(tuned, adapted)
    else:
        head = fit_head(then, adapted)
    head.config["finetune"] = {k: v for k, v in tuned.config.items() if k not in ("history",)}
    head.encoder = encoder
    return head
