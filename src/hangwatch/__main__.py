"""``python -m hangwatch``: the same as the ``hangwatch`` command."""

from __future__ import annotations

import sys

from .launch import main

if __name__ == "__main__":
    sys.exit(main())
