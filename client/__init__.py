"""The client layer: the ``smartpath`` CLI, the gRPC clients, overlays and GeoJSON."""

from smartpath.client.rpc import PathologyClient, TilerClient, question, tile_spec

__all__ = ["PathologyClient", "TilerClient", "question", "tile_spec"]
