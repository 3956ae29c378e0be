#!/usr/bin/env python
"""The web UI: python webui/app.py [--base MODEL] [--adapters_dir DIR] [--host 127.0.0.1] [--port 7860] [--share]."""
import sys

from singlora_diffusion.webui.app import main

if __name__ == "__main__":
    sys.exit(main())
