import sys

from mlae.cli import main

sys.exit(main())
