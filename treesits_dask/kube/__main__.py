import sys

from .render import main

if __name__ == "__main__":
    sys.exit(main())
