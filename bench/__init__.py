"""kvmnetd benchmarks: `bench/run [--quick]` (as root) prints one JSON document."""
