"""``python -m service.cli``: the ``tfdeploy`` command."""

import sys

from service.cli import main

if __name__ == "__main__":  # not when imported (the image imports every module of service/)
    sys.exit(main())
