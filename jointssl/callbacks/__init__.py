"""Lightning callbacks of jointssl (requeue on Slurm signals, example-image logging, resumable RNG state).

Each callback lives in its own module; configs name them by their full class path."""
