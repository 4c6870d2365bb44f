"""``python -m qaft ...`` (what ``accelerate launch -m qaft train CONFIG`` runs): the CLI."""

import sys

from qaft.pipeline.cli import main

sys.exit(main())
