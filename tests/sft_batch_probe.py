"""``zeda`` that writes down every SFT batch its process takes, for the distributed test.

Launched (by ``accelerate launch``) in place of ``-m zeda_cli.main``: each process appends one JSON
line per step, its rows as ``[prompt_ids, completion_ids]``, to ``$ZEDA_BATCH_LOG.<rank>``.
"""

import json
import os
import sys

from zeda_cli.main import main
from zeda_trainer.stages import sft

_collate = sft.collate


def _logged_collate(records, *args, **kwargs):
    with open(f"{os.environ['ZEDA_BATCH_LOG']}.{os.environ.get('RANK', '0')}", "a") as log:
        log.write(json.dumps([[r["prompt_ids"], r["completion_ids"]] for r in records]) + "\n")
    return _collate(records, *args, **kwargs)


sft.collate = _logged_collate
sys.exit(main(sys.argv[1:]))
