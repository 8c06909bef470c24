"""``python -m timm_epsa``: the ``timm-epsa`` command, where the script's folder is not on PATH."""
import sys

from .cli import main

sys.exit(main())
