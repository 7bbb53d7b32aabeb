import sys

from mlae.cli import main

if __name__ == "__main__":  # guarded: `mlae sweep --jobs N` starts its workers with multiprocessing's spawn
    sys.exit(main())
