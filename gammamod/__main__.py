import sys

from gammamod.cli import main

sys.exit(main())
