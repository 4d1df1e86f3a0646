"""The slide tiling service: open slides, detect tissue, plan tiles at a physical resolution,
read them fast; and its Ray Serve deployment."""
