"""train.py, killed with SIGKILL at an exact point of writing one checkpoint, for
tests/test_resume.py: a kill -9 that lands where the test says, not where a timer does.

    python tests/killed_train.py POINT STEP [train.py arguments...]

POINT is where the process dies while it saves the checkpoint of step STEP:
  mid-write    the new file's bytes half written to its temporary file
  before-link  the new step_<STEP> file complete, `last` still the previous checkpoint
  mid-link     a hard link to the new file made beside `last`, not yet renamed over it
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
import utils.checkpoint  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(point: str, step: int, argv: list[str]) -> int:
    real_save, real_link = utils.checkpoint.save_file, os.link
    step_file = f"step_{step}{utils.checkpoint.CHECKPOINT_SUFFIX}"

    def save_file(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        state = json.loads(metadata[utils.checkpoint.STATE_METADATA_KEY])
        if point == "mid-write" and state["step"] == step:
            size = Path(path).stat().st_size
            os.truncate(path, size // 2)
            die()

    def link(source, target, **kwargs):
        if Path(source).name == step_file:
            if point == "before-link":
                die()
            real_link(source, target, **kwargs)
            if point == "mid-link":
                die()
            return
        real_link(source, target, **kwargs)

    utils.checkpoint.save_file = save_file
    os.link = link  # the function utils/checkpoint.py links names with
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
