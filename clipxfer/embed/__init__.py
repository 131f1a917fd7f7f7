"""Scale-out embedding: image sources beyond folders -> parquet embedding shards -> an index.

``from clipxfer.embed import embed``: the one entry point that embeds a source (a folder,
webdataset tar shards, parquet, a saved HF dataset) on this machine or on a Ray cluster (see
:mod:`.run`). :func:`ingest` builds an index from shards and :func:`export_embeddings` writes
an index's vectors back out in the same format (:mod:`.shards`, documented in docs/scale-out.md).
"""

from .export import export_embeddings
from .ingest import IngestReport, ingest
from .run import EmbedReport, embed
from .shards import iter_embeddings, open_embeddings

__all__ = ["embed", "EmbedReport", "ingest", "IngestReport", "export_embeddings", "iter_embeddings", "open_embeddings"]
