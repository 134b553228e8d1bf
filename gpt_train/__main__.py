import sys

from gpt_train.cli import main

if __name__ == "__main__":  # prepare's worker processes import this module again under another name
    sys.exit(main())
