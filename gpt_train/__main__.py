import sys

from gpt_train.cli import main

sys.exit(main())
