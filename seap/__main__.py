import sys

from seap.cli import main

sys.exit(main())
