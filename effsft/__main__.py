import sys

from effsft.cli import main

sys.exit(main())
