"""planemesh benchmarks: `./run.sh bench NAME [ARGS]` (python -m bench NAME). They measure; they never assert."""
