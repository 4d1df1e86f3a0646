"""The slide feature cache in object storage: ``features/{slide_id}/{encoder}/{plan_hash}``.

A second question about the same slide content, encoder and tile plan reads the tile
features back instead of tiling and encoding again. Keys use the slide's content id (its
ETag), so a changed object never hits a stale entry.
"""

from __future__ import annotations

import logging
import re

from smartpath.core.errors import NotFoundError
from smartpath.core.storage import ObjectRef, ObjectStore
from smartpath.model.slide_features import SlideFeatures, features_bytes, load_features

logger = logging.getLogger("smartpath.encoding")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class FeatureCache:
    """Tile features of slides, stored as safetensors objects in ``bucket``."""

    def __init__(self, store: ObjectStore, bucket: str) -> None:
        self.store = store
        self.bucket = bucket
        self._bucket_ready = False

    def ref(self, slide_id: str, encoder: str, plan_hash: str) -> ObjectRef:
        """Where the features of this slide, encoder and plan live."""
        parts = (_UNSAFE.sub("_", p) for p in (slide_id, encoder, plan_hash))
        return ObjectRef(self.bucket, "features/{}/{}/{}.safetensors".format(*parts))

    def get(self, ref: ObjectRef) -> SlideFeatures | None:
        """The cached features, or None (a missing or unreadable entry is a miss)."""
        try:
            return load_features(self.store.get_bytes(ref))
        except NotFoundError:
            return None
        except ValueError:
            logger.warning("feature cache entry is unreadable; recomputing")
            return None

    def put(self, ref: ObjectRef, features: SlideFeatures) -> None:
        """Store features (best effort: a failed write only costs a later miss)."""
        try:
            if not self._bucket_ready:
                self.store.ensure_bucket(self.bucket)
                self._bucket_ready = True
            self.store.put_bytes(ref, features_bytes(features))
        except Exception:
            logger.warning("feature cache write failed", exc_info=True)
