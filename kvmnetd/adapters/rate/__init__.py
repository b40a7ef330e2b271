"""Per-port rate limits: tc qdiscs (written with iproute2's tc and ip) and tc events."""
