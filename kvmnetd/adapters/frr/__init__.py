"""FRR: kvmnetd's part of its configuration applied the safe way, and FRR watched."""
