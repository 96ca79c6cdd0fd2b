"""A config file that reads the config a run saved: `--config=PATH/saved_config.py:RUN/
config.json`. `moetrain train --workdir=RUN` without --config uses it when RUN/config.json
exists (a run to resume, or one written by `moetrain import`); `--config.KEY=VALUE`
overrides work as with any config file."""

import json

from moetrain import config as config_lib
from moetrain import paths


def get_config(path: str):
  if not paths.is_file(path):
    raise config_lib.ConfigError(f'{path} does not exist; pass --config=FILE.')
  return config_lib.from_dict(json.loads(paths.read_text(path)))
