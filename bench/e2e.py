"""End-to-end benchmark, peers side by side: ``python bench/e2e.py --help`` (same as ``pylogstreams bench``)."""
import sys
from broker.bench import main
if __name__ == "__main__":
    sys.exit(main())
