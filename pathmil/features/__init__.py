"""Stage 2: frozen encoders, the extraction loop, and the bag file format (ours and other tools')."""
