"""Stage 1: slides, their resolution, tissue segmentation, the tile grid and QC pictures."""
