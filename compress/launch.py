"""The ``compress`` console entry point: an unsupported model is refused from its ``config.json``
before torch and transformers are imported (which takes seconds), then the CLI runs.

Only what can be read without those libraries is checked here (:func:`compress.arch.check_early`,
for the commands whose first argument is a model folder); everything else, and every other input,
is checked by the command itself as before.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# the commands whose first positional argument is the model to compress
MODEL_COMMANDS = {"quantize", "prune", "qat", "imatrix"}


def _model_config(argv: list[str]) -> dict | None:
    """The JSON config of the model folder right after a model command (the group's own options
    are flags), when it is a local folder holding one."""
    i = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if i is None or argv[i] not in MODEL_COMMANDS or i + 1 >= len(argv) or argv[i + 1].startswith("-"):
        return None
    cfg = Path(argv[i + 1]) / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None                     # not a folder with a readable config: the command says why
    return data if isinstance(data, dict) else None


def main() -> None:
    argv = sys.argv[1:]
    config = _model_config(argv)
    if config is not None and "--debug" not in argv:
        from .arch import check_early
        from .errors import CompressError
        try:
            check_early(config)
        except CompressError as e:
            print(f"Error: {e}", file=sys.stderr)
            sys.exit(1)
    from .cli import main as cli_main
    cli_main()
