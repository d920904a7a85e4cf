"""`python -m dydit_scale.train RECIPE [a.b=c ...]` — for `deepspeed --module`, `torchrun -m` and srun.

The DeepSpeed runner appends `--local_rank=N` unless told `--no_local_rank`; ranks are read from the
environment either way, so the flag is accepted and ignored.
"""

import sys

from dydit_scale.train.entry import main

if __name__ == "__main__":
    sys.exit(main())
