"""`python -m dsv4_jax ...` (same as the `dsv4-jax` script)."""

import sys

from dsv4_jax.cli import main

sys.exit(main())
