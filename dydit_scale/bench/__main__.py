"""`python -m dydit_scale.bench` = `dydit-bench`."""

import sys

from dydit_scale.bench import main

if __name__ == "__main__":
    sys.exit(main())
