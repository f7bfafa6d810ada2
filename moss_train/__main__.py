import sys

from moss_train.cli import main

sys.exit(main())
