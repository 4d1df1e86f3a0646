"""The slide feature cache on a real S3 server: an entry is one object written whole (a PUT),
and a damaged or cut entry is a miss (recomputed), never features."""

from __future__ import annotations

import numpy as np
import pytest

from smartpath.core.config import StorageConfig
from smartpath.core.storage import ObjectRef, make_store
from smartpath.model.slide_features import SlideFeatures, features_bytes, load_features
from smartpath.services.encoding.cache import FeatureCache


def _features(seed: int = 0) -> SlideFeatures:
    rng = np.random.default_rng(seed)
    return SlideFeatures(
        features=rng.normal(size=(12, 32)).astype(np.float32),
        coords=rng.integers(0, 50_000, size=(12, 2)),
        mpp=0.5,
        tile_size_px=256,
        encoder="stain-stats-v1",
    )


def test_feature_files_carry_a_checksum_of_their_arrays() -> None:
    data = features_bytes(_features())
    loaded = load_features(data)
    np.testing.assert_array_equal(loaded.features, _features().features)
    # One flipped bit in the last feature value: still a well-formed file, wrong numbers.
    damaged = bytearray(data)
    n = int.from_bytes(data[:8], "little")
    damaged[8 + n + 12 * 32 * 4 - 1] ^= 0x01
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_features(bytes(damaged))


@pytest.mark.parametrize("damage", ["flipped", "cut", "empty"])
def test_a_damaged_entry_is_a_miss_and_is_rewritten(
    s3_config: StorageConfig, bucket_name: str, damage: str
) -> None:
    store = make_store(s3_config)
    cache = FeatureCache(store, bucket_name)
    ref = cache.ref("etag-1", "stain-stats-v1", "plan-a")
    cache.put(ref, _features())
    assert cache.get(ref) is not None
    data = bytearray(store.get_bytes(ref))
    if damage == "flipped":
        data[-1] ^= 0x80
    elif damage == "cut":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    store.put_bytes(ref, bytes(data))
    assert cache.get(ref) is None  # a miss: the caller recomputes
    cache.put(ref, _features())
    hit = cache.get(ref)
    assert hit is not None
    np.testing.assert_array_equal(hit.coords, _features().coords)
    assert isinstance(ref, ObjectRef) and ref.key.endswith(".safetensors")
