"""A config file that reads the config a run saved: `--config=PATH/saved_config.py:RUN/
config.json`. `moetrain train --workdir=RUN` without --config uses it when RUN/config.json
exists (a run to resume, or one written by `moetrain import`); `--config.KEY=VALUE`
overrides work as with any config file."""

import json
import pathlib

from moetrain import config as config_lib


def get_config(path: str):
  file = pathlib.Path(path)
  if not file.is_file():
    raise config_lib.ConfigError(f'{path} does not exist; pass --config=FILE.')
  return config_lib.from_dict(json.loads(file.read_text()))
